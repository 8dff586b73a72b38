"""Writes benches/route_set.jsonl: the router benchmark's prompts with checkable answers (written for
this project). Each line: {"kind", "prompt", "answers", "split"}; a completion is right when it
contains one of `answers` as whole words (case-insensitive). Within each kind every other prompt is
`tune` (what `hearth route calibrate` fits thresholds on) and the rest `heldout` (never tuned on). Completion-style prompts, so the instruct model
and the base model read them the same way. Deterministic: rerun to regenerate the same file.

    python3 benches/make_route_set.py
"""
import json
import pathlib

CAPITALS = {
    "France": "Paris", "Japan": "Tokyo", "Italy": "Rome", "Germany": "Berlin", "Spain": "Madrid",
    "Egypt": "Cairo", "Russia": "Moscow", "China": "Beijing", "Canada": "Ottawa", "Australia": "Canberra",
    "Brazil": "Brasilia", "Mexico": "Mexico City", "India": "New Delhi", "Greece": "Athens",
    "Portugal": "Lisbon", "Ireland": "Dublin", "Norway": "Oslo", "Sweden": "Stockholm",
    "Finland": "Helsinki", "Poland": "Warsaw", "Austria": "Vienna", "Hungary": "Budapest",
    "Kenya": "Nairobi", "Argentina": "Buenos Aires", "Peru": "Lima", "Chile": "Santiago",
    "Thailand": "Bangkok", "Vietnam": "Hanoi", "Turkey": "Ankara", "Denmark": "Copenhagen",
    "the Netherlands": "Amsterdam", "Belgium": "Brussels", "Switzerland": "Bern", "Cuba": "Havana",
    "South Korea": "Seoul", "Iran": "Tehran", "Iraq": "Baghdad", "Nigeria": "Abuja",
    "Colombia": "Bogota", "the United Kingdom": "London",
}
OPPOSITES = {
    "hot": "cold", "up": "down", "big": "small", "fast": "slow", "happy": "sad", "light": "dark",
    "open": "close", "early": "late", "rich": "poor", "old": "young", "wet": "dry", "hard": "soft",
    "full": "empty", "strong": "weak", "high": "low", "long": "short", "win": "lose", "push": "pull",
    "day": "night", "black": "white", "inside": "outside", "buy": "sell", "left": "right",
    "true": "false", "thick": "thin", "heavy": "light", "love": "hate", "north": "south",
    "first": "last", "begin": "end",
}
PLURALS = {
    "mouse": "mice", "child": "children", "man": "men", "woman": "women", "tooth": "teeth",
    "foot": "feet", "goose": "geese", "person": "people", "leaf": "leaves", "knife": "knives",
    "wolf": "wolves", "box": "boxes", "city": "cities", "baby": "babies", "bus": "buses",
    "ox": "oxen", "cactus": "cacti", "potato": "potatoes", "sheep": "sheep", "fish": "fish",
    "half": "halves", "life": "lives", "wife": "wives", "hero": "heroes", "church": "churches",
}
SYMBOLS = {
    "gold": "Au", "silver": "Ag", "iron": "Fe", "oxygen": "O", "hydrogen": "H", "carbon": "C",
    "sodium": "Na", "potassium": "K", "copper": "Cu", "lead": "Pb", "helium": "He", "nitrogen": "N",
    "calcium": "Ca", "mercury": "Hg", "tin": "Sn", "zinc": "Zn", "neon": "Ne", "sulfur": "S",
    "chlorine": "Cl", "uranium": "U",
}
AUTHORS = {
    "Romeo and Juliet": "Shakespeare", "Hamlet": "Shakespeare", "Pride and Prejudice": "Austen",
    "Oliver Twist": "Dickens", "A Christmas Carol": "Dickens", "War and Peace": "Tolstoy",
    "1984": "Orwell", "Animal Farm": "Orwell", "The Odyssey": "Homer", "Don Quixote": "Cervantes",
    "Moby-Dick": "Melville", "Frankenstein": "Shelley", "Dracula": "Stoker",
    "The Adventures of Tom Sawyer": "Twain", "Macbeth": "Shakespeare",
    "Crime and Punishment": "Dostoevsky", "The Divine Comedy": "Dante", "Faust": "Goethe",
    "Les Miserables": "Hugo", "The Raven": "Poe",
}
SEQUENCES = [
    ("Monday, Tuesday, Wednesday,", ["Thursday"]),
    ("Tuesday, Wednesday, Thursday,", ["Friday"]),
    ("Thursday, Friday, Saturday,", ["Sunday"]),
    ("January, February, March,", ["April"]),
    ("April, May, June,", ["July"]),
    ("July, August, September,", ["October"]),
    ("September, October, November,", ["December"]),
    ("A, B, C, D,", ["E"]),
    ("one, two, three, four,", ["five"]),
    ("six, seven, eight,", ["nine"]),
    ("first, second, third,", ["fourth"]),
    ("spring, summer, autumn,", ["winter"]),
    ("red, orange, yellow, green,", ["blue"]),
    ("Mercury, Venus, Earth,", ["Mars"]),
    ("do, re, mi, fa,", ["sol", "so"]),
]
FACTS = [
    ("The color of the sky on a clear day is", ["blue"]),
    ("The color of grass is", ["green"]),
    ("The largest planet in the solar system is", ["Jupiter"]),
    ("The planet closest to the Sun is", ["Mercury"]),
    ("The Red Planet is", ["Mars"]),
    ("The largest ocean on Earth is the", ["Pacific"]),
    ("The longest river in Africa is the", ["Nile"]),
    ("The tallest mountain in the world is Mount", ["Everest"]),
    ("Water is made of hydrogen and", ["oxygen"]),
    ("The number of days in a week is", ["seven", "7"]),
    ("The number of months in a year is", ["twelve", "12"]),
    ("The number of legs a spider has is", ["eight", "8"]),
    ("The number of continents on Earth is", ["seven", "7"]),
    ("The first president of the United States was George", ["Washington"]),
    ("The theory of relativity was developed by Albert", ["Einstein"]),
    ("The Mona Lisa was painted by Leonardo da", ["Vinci"]),
    ("The freezing point of water in degrees Celsius is", ["0", "zero"]),
    ("The boiling point of water in degrees Celsius is", ["100"]),
    ("The animal known as the king of the jungle is the", ["lion"]),
    ("The fastest land animal is the", ["cheetah"]),
    ("The largest mammal in the world is the", ["blue whale", "whale"]),
    ("Bees make", ["honey"]),
    ("A baby cat is called a", ["kitten"]),
    ("A baby dog is called a", ["puppy"]),
    ("The opposite of north is", ["south"]),
    ("The currency of Japan is the", ["yen"]),
    ("The currency of the United Kingdom is the pound", ["sterling", "pound"]),
    ("The language spoken in Brazil is", ["Portuguese"]),
    ("The language spoken in Mexico is", ["Spanish"]),
    ("The hardest natural substance is", ["diamond"]),
]
FRENCH = {
    "cat": "chat", "dog": "chien", "house": "maison", "water": "eau", "bread": "pain",
    "book": "livre", "car": "voiture", "sun": "soleil", "moon": "lune", "apple": "pomme",
    "cheese": "fromage", "red": "rouge", "black": "noir", "hello": "bonjour", "thank you": "merci",
}


def main():
    rows = []
    seen = {}

    def add(kind, prompt, answers):
        seen[kind] = seen.get(kind, 0) + 1
        split = "tune" if seen[kind] % 2 else "heldout"
        rows.append({"kind": kind, "prompt": prompt, "answers": answers, "split": split})

    for country, city in CAPITALS.items():
        add("capital", f"Q: What is the capital of {country}?\nA: The capital of {country} is", [city])
    for a in range(2, 14):
        for b in (3, 7, 9):
            add("arithmetic", f"Q: What is {a} plus {b}?\nA: {a} plus {b} is", [str(a + b)])
    for a, b in [(3, 4), (6, 7), (8, 9), (5, 5), (12, 3), (7, 8), (9, 9), (4, 6), (11, 11), (2, 13)]:
        add("arithmetic", f"Q: What is {a} times {b}?\nA: {a} times {b} is", [str(a * b)])
    for w, o in OPPOSITES.items():
        add("opposite", f"The opposite of \"{w}\" is \"", [o])
    for w, p in PLURALS.items():
        add("plural", f"The plural of \"{w}\" is \"", [p])
    for el, sym in SYMBOLS.items():
        add("chemistry", f"Q: What is the chemical symbol for {el}?\nA: The chemical symbol for {el} is", [sym])
    for book, author in AUTHORS.items():
        add("author", f"Q: Who wrote {book}?\nA: {book} was written by", [author])
    for prompt, answers in SEQUENCES:
        add("sequence", f"Continue the list: {prompt}", answers)
    for prompt, answers in FACTS:
        add("fact", prompt, answers)
    for en, fr in FRENCH.items():
        add("french", f"The French word for \"{en}\" is \"", [fr])
    out = pathlib.Path(__file__).with_name("route_set.jsonl")
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    kinds = sorted({r["kind"] for r in rows})
    print(f"{len(rows)} prompts of {len(kinds)} kinds -> {out}")


if __name__ == "__main__":
    main()
