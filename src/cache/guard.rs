//! Checks a semantic hit must pass besides similarity: what sentence embeddings are known to blur.
//! Two questions that differ in a number ("17 times 23" / "17 times 24"), in polarity ("can I" /
//! "can't I", "with" / "without"), in direction ("before" / "after") or in one slot of the same
//! sentence ("capital of France" / "capital of Germany", "in stock" / "out of stock") embed almost
//! identically and need different answers; a paraphrase keeps its numbers and polarity and rewords
//! rather than refilling one slot. So a hit also needs the same numbers (digits, or number words
//! up to twenty and the tens), the same negation parity, no word swapped for its opposite, and no
//! small in-place edit of an otherwise identical sentence that changes a content word (or a
//! direction word such as "to" / "from") on both sides. A paraphrase that differs only by one
//! synonym in place ("largest" / "biggest") is refused too: lexically it is a refilled slot.

/// Function words: a paraphrase adds, drops and changes these freely.
const STOPWORDS: &[&str] = &[
    "a",
    "an",
    "the",
    "and",
    "or",
    "but",
    "if",
    "then",
    "so",
    "of",
    "to",
    "in",
    "on",
    "at",
    "by",
    "for",
    "from",
    "with",
    "about",
    "as",
    "into",
    "onto",
    "per",
    "via",
    "is",
    "are",
    "was",
    "were",
    "be",
    "been",
    "being",
    "am",
    "do",
    "does",
    "did",
    "doing",
    "done",
    "have",
    "has",
    "had",
    "can",
    "could",
    "will",
    "would",
    "shall",
    "should",
    "may",
    "might",
    "must",
    "i",
    "me",
    "my",
    "mine",
    "we",
    "us",
    "our",
    "you",
    "your",
    "yours",
    "he",
    "she",
    "it",
    "its",
    "they",
    "them",
    "their",
    "this",
    "that",
    "these",
    "those",
    "there",
    "here",
    "what",
    "whats",
    "which",
    "who",
    "whom",
    "whose",
    "when",
    "where",
    "why",
    "how",
    "hows",
    "im",
    "ive",
    "id",
    "youre",
    "theres",
    "thats",
    "please",
    "pls",
    "plz",
    "thanks",
    "thank",
    "hi",
    "hello",
    "hey",
    "just",
    "quick",
    "question",
    "tell",
    "know",
    "want",
    "like",
    "need",
    "let",
    "lets",
    "get",
    "got",
    "give",
    "find",
    "show",
    "explain",
    "any",
    "some",
    "all",
    "also",
    "too",
    "very",
    "really",
    "exactly",
    "currently",
    "actually",
    "kindly",
    "s",
    "t",
    "d",
    "ll",
    "re",
    "ve",
    "m",
    "one",
    "up",
    "out",
    "there",
];

/// An in-place edit is at most this many words on each side...
const MAX_EDIT: usize = 4;
/// ...in a sentence whose unchanged words are at least this share of the longer one.
const MIN_KEPT: f64 = 0.5;

/// Function words whose swap for each other in place changes the answer.
const DIRECTIONS: &[(&str, &str)] = &[
    ("to", "from"),
    ("in", "out"),
    ("on", "off"),
    ("up", "down"),
    ("into", "out"),
    ("for", "against"),
];

/// Words that negate the sentence they are in.
const NEGATIONS: &[&str] = &[
    "not", "no", "never", "without", "cannot", "none", "nobody", "nothing", "neither", "nor",
    "nowhere", "isnt", "arent", "wasnt", "werent", "dont", "doesnt", "didnt", "cant", "couldnt",
    "wont", "wouldnt", "shouldnt", "mustnt", "hasnt", "havent", "hadnt", "aint", "neednt",
    "mightnt", "shant", "unable", "non",
];

/// Words with an opposite that flips the answer.
const OPPOSITES: &[(&str, &str)] = &[
    ("before", "after"),
    ("increase", "decrease"),
    ("increases", "decreases"),
    ("increased", "decreased"),
    ("raise", "lower"),
    ("higher", "lower"),
    ("above", "below"),
    ("over", "under"),
    ("more", "less"),
    ("more", "fewer"),
    ("most", "least"),
    ("maximum", "minimum"),
    ("max", "min"),
    ("enable", "disable"),
    ("enabled", "disabled"),
    ("allow", "deny"),
    ("allowed", "forbidden"),
    ("allowed", "prohibited"),
    ("add", "remove"),
    ("upload", "download"),
    ("import", "export"),
    ("buy", "sell"),
    ("start", "stop"),
    ("open", "close"),
    ("first", "last"),
    ("earliest", "latest"),
    ("oldest", "newest"),
    ("inbound", "outbound"),
    ("incoming", "outgoing"),
    ("lock", "unlock"),
    ("include", "exclude"),
    ("included", "excluded"),
    ("encrypt", "decrypt"),
    ("join", "leave"),
    ("hire", "fire"),
    ("read", "write"),
    ("send", "receive"),
    ("sent", "received"),
    ("give", "take"),
    ("lend", "borrow"),
    ("push", "pull"),
    ("create", "delete"),
    ("created", "deleted"),
    ("credit", "debit"),
    ("income", "expense"),
    ("profit", "loss"),
    ("gain", "loss"),
    ("win", "lose"),
    ("true", "false"),
    ("accept", "reject"),
    ("approve", "reject"),
    ("approved", "rejected"),
    ("subscribe", "unsubscribe"),
    ("install", "uninstall"),
    ("public", "private"),
    ("internal", "external"),
    ("north", "south"),
    ("east", "west"),
    ("left", "right"),
    ("fastest", "slowest"),
    ("largest", "smallest"),
    ("biggest", "smallest"),
    ("longest", "shortest"),
    ("highest", "lowest"),
    ("hottest", "coldest"),
    ("high", "low"),
    // Verbs with a particle: the pair as one unit ("turn on" / "turn off").
    ("turn on", "turn off"),
    ("switch on", "switch off"),
    ("scale up", "scale down"),
    ("log in", "log out"),
    ("sign in", "sign out"),
    ("opt in", "opt out"),
    ("check in", "check out"),
    ("speed up", "slow down"),
    ("back up", "restore"),
];

const NUMBER_WORDS: &[(&str, u64)] = &[
    ("zero", 0),
    ("two", 2),
    ("three", 3),
    ("four", 4),
    ("five", 5),
    ("six", 6),
    ("seven", 7),
    ("eight", 8),
    ("nine", 9),
    ("ten", 10),
    ("eleven", 11),
    ("twelve", 12),
    ("thirteen", 13),
    ("fourteen", 14),
    ("fifteen", 15),
    ("sixteen", 16),
    ("seventeen", 17),
    ("eighteen", 18),
    ("nineteen", 19),
    ("twenty", 20),
    ("thirty", 30),
    ("forty", 40),
    ("fifty", 50),
    ("sixty", 60),
    ("seventy", 70),
    ("eighty", 80),
    ("ninety", 90),
    ("hundred", 100),
    ("thousand", 1000),
    ("million", 1_000_000),
    ("billion", 1_000_000_000),
    ("twice", 2),
    ("dozen", 12),
    // Ordinals from the third ("first" and "second" are as often "earliest" and a time unit);
    // "3rd" is the digits 3.
    ("third", 3),
    ("fourth", 4),
    ("fifth", 5),
    ("sixth", 6),
    ("seventh", 7),
    ("eighth", 8),
    ("ninth", 9),
    ("tenth", 10),
    ("eleventh", 11),
    ("twelfth", 12),
    ("thirteenth", 13),
    ("fourteenth", 14),
    ("fifteenth", 15),
    ("twentieth", 20),
    ("thirtieth", 30),
    ("hundredth", 100),
];

/// Months and weekdays: a date's parts ("the March 3 outage" / "the April 3 outage"). Counted as
/// numbers of their own kind ("may" the modal verb is a month only when capitalized mid-text).
const CALENDAR: &[&str] = &[
    "january",
    "february",
    "march",
    "april",
    "june",
    "july",
    "august",
    "september",
    "october",
    "november",
    "december",
    "monday",
    "tuesday",
    "wednesday",
    "thursday",
    "friday",
    "saturday",
    "sunday",
    "weekday",
    "weekend",
    "today",
    "tomorrow",
    "yesterday",
];

/// The calendar word `w` names, its abbreviation written out ("jan" is "january").
fn calendar_name(w: &str) -> Option<&'static str> {
    const MONTH_ABBREVIATIONS: &[&str] = &[
        "jan", "feb", "mar", "apr", "jun", "jul", "aug", "sep", "sept", "oct", "nov", "dec",
    ];
    if MONTH_ABBREVIATIONS.contains(&w) {
        return CALENDAR.iter().find(|c| c.starts_with(&w[..3])).copied();
    }
    CALENDAR.iter().find(|c| **c == w).copied()
}

/// Lower-case words (letters and digits; apostrophes dropped, so "can't" is "cant").
fn words(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    for c in text.chars() {
        if c.is_alphanumeric() {
            cur.extend(c.to_lowercase());
        } else if c == '\'' || c == '\u{2019}' {
            continue;
        } else if !cur.is_empty() {
            out.push(std::mem::take(&mut cur));
        }
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

/// The digit runs of `text` in order, with their decimal part ("3.5", "1,000" -> "1000") and a
/// minus sign that stands before them as a word's start ("-3", not the "-" of "COVID-19").
fn digit_runs(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let chars: Vec<char> = text.chars().collect();
    let mut i = 0;
    while i < chars.len() {
        if chars[i].is_ascii_digit() {
            let signed = i > 0
                && matches!(chars[i - 1], '-' | '\u{2212}')
                && (i == 1 || chars[i - 2].is_whitespace() || chars[i - 2] == '(');
            let mut n = if signed {
                "-".to_string()
            } else {
                String::new()
            };
            while i < chars.len() {
                let c = chars[i];
                let joins = (c == '.' || c == ',')
                    && chars.get(i + 1).is_some_and(char::is_ascii_digit)
                    && n.chars().any(|d| d.is_ascii_digit());
                if c.is_ascii_digit() {
                    n.push(c);
                } else if joins && c == '.' {
                    n.push('.');
                } else if !joins {
                    break;
                }
                i += 1;
            }
            out.push(n);
        } else {
            i += 1;
        }
    }
    out
}

/// The numbers of `text`, sorted: its digit runs, and number words as digits ("one" is left
/// out: it is as often a pronoun).
fn numbers(text: &str) -> Vec<String> {
    let mut out = digit_runs(text);
    for w in words(text) {
        if let Some((_, n)) = NUMBER_WORDS.iter().find(|(name, _)| *name == w) {
            out.push(n.to_string());
        } else if let Some(c) = calendar_name(&w) {
            out.push(c.to_string());
        }
    }
    // "May" the month: capitalized and not where a sentence starts.
    let mut start = true;
    for raw in text.split_whitespace() {
        let w = raw.trim_matches(|c: char| !c.is_alphanumeric());
        if !start && w == "May" {
            out.push("may".to_string());
        }
        if let Some(n) = roman(w) {
            out.push(n.to_string());
        }
        start = raw.ends_with(['.', '?', '!', ':']);
    }
    out.sort();
    out
}

/// The value of an upper-case Roman numeral from II to XXXIX ("World War II", "Phase III"); "I"
/// is the pronoun, and letters beyond X are as often initials ("CV", "MD").
fn roman(w: &str) -> Option<u32> {
    if w.len() < 2 || !w.chars().all(|c| matches!(c, 'I' | 'V' | 'X')) {
        return None;
    }
    let ones = ["", "I", "II", "III", "IV", "V", "VI", "VII", "VIII", "IX"];
    (2..40).find(|n: &u32| {
        format!(
            "{}{}",
            "X".repeat((n / 10) as usize),
            ones[(n % 10) as usize]
        ) == w
    })
}

/// Prefixes that negate the word they are put before ("paid" / "unpaid", "eligible" /
/// "ineligible", "connect" / "disconnect", "compliant" / "non-compliant").
const NEGATING_PREFIXES: &[&str] = &["un", "in", "im", "il", "ir", "dis", "non"];

/// Whether one side has a word and the other the word negated by a prefix (and not the word).
fn prefix_negated(a: &[String], b: &[String]) -> bool {
    let one_way = |a: &[String], b: &[String]| {
        a.iter()
            .filter(|x| x.len() >= 4 && !b.contains(x))
            .any(|x| {
                NEGATING_PREFIXES.iter().any(|p| {
                    let neg = format!("{p}{x}");
                    b.contains(&neg) && !a.contains(&neg)
                })
            })
    };
    one_way(a, b) || one_way(b, a)
}

/// Names in `text`, lower-cased: capitalized words not where a sentence starts, all-capital
/// words ("VPN") and words mixing letters and digits ("A100", "M365").
fn names(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut start = true;
    for raw in text.split_whitespace() {
        let w = raw.trim_matches(|c: char| !c.is_alphanumeric());
        let mut chars = w.chars();
        let capital = chars.next().is_some_and(char::is_uppercase);
        let all_caps = w.chars().filter(|c| c.is_alphabetic()).count() >= 2
            && !w.chars().any(char::is_lowercase);
        let mixed = w.chars().any(|c| c.is_ascii_digit()) && w.chars().any(char::is_alphabetic);
        if (capital && !start && w != "I") || all_caps || mixed {
            out.extend(words(w));
        }
        start = raw.ends_with(['.', '?', '!', ':']) || (start && w.is_empty());
    }
    out
}

/// The literals a text quotes (double quotes or backticks), as words: what the question is about,
/// taken literally ("the French word for \"dog\"", "what does `git stash` do").
fn quoted(text: &str) -> Vec<Vec<String>> {
    let mut out = Vec::new();
    let mut open: Option<(char, String)> = None;
    for c in text.chars() {
        let closes = |o: char| matches!((o, c), ('"', '"') | ('`', '`') | ('\u{201c}', '\u{201d}'));
        match &mut open {
            Some((o, s)) if closes(*o) => {
                let ws = words(s);
                if !ws.is_empty() {
                    out.push(ws);
                }
                open = None;
            }
            Some((_, s)) => s.push(c),
            None if matches!(c, '"' | '`' | '\u{201c}') => open = Some((c, String::new())),
            None => {}
        }
    }
    out.sort();
    out.dedup();
    out
}

/// Whether both texts name what they are about (`of`: quoted terms, listed items) and it differs,
/// however the rest is reworded ("the opposite of \"big\"" / "the word opposite in meaning to
/// \"long\""; "Continue the list: A, B, C, D," / "Continue the list: do, re, mi, fa,").
fn both_differ<T: PartialEq>(of: fn(&str) -> Vec<T>, cached: &str, asked: &str) -> bool {
    let (a, b) = (of(cached), of(asked));
    !a.is_empty() && !b.is_empty() && a != b
}

/// The items of a text's enumerations of one-word items ("Continue the list: do, re, mi, fa," has
/// do, re, mi and fa), sorted: what a sequence or list question is about. Only runs of at least
/// three items, so a clause's comma is not a list.
fn listed(text: &str) -> Vec<String> {
    let segments: Vec<Vec<String>> = text.split(',').map(words).collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i + 1 < segments.len() {
        // A run: segment i ends with the first item, the segments after it are one word each,
        // and the segment after them may start with the last item.
        let mut j = i + 1;
        while j < segments.len() && segments[j].len() == 1 {
            j += 1;
        }
        let mut items: Vec<String> = segments[i].last().into_iter().cloned().collect();
        items.extend(segments[i + 1..j].iter().flatten().cloned());
        if let Some(last) = segments.get(j).and_then(|s| s.first()) {
            items.push(last.clone());
        }
        if j > i + 1 && items.len() >= 3 {
            out.extend(items);
        }
        i = j.max(i + 1);
    }
    out.sort();
    out.dedup();
    out
}

/// The arithmetic a text asks for, by operation ("plus" and "add" are one).
fn operations(ws: &[String]) -> std::collections::BTreeSet<&'static str> {
    ws.iter()
        .filter_map(|w| match w.as_str() {
            "plus" | "add" | "added" | "sum" => Some("+"),
            "minus" | "subtract" | "subtracted" | "less" | "difference" => Some("-"),
            "times" | "multiplied" | "multiply" | "product" => Some("*"),
            "divided" | "divide" | "over" | "quotient" => Some("/"),
            _ => None,
        })
        .collect()
}

/// Whether both ask for arithmetic on numbers and the operations differ ("9 plus 9" / "9 times
/// 9"): the numbers agree, the answer does not.
fn other_operation(cached: &str, a: &[String], b: &[String]) -> bool {
    let (x, y) = (operations(a), operations(b));
    !digit_runs(cached).is_empty() && !x.is_empty() && !y.is_empty() && x != y
}

/// Whether each side names something the other does not mention ("reset my Okta password" /
/// "how do I get my Jira password reset"): another entity, however the rest is reworded.
fn other_name(cached: &str, asked: &str, a: &[String], b: &[String]) -> bool {
    // "Earth" and "Earth's" (words drop the apostrophe: "earths") are one name.
    let mentions = |other: &[String], n: &str| {
        other
            .iter()
            .any(|w| w == n || w.strip_suffix('s') == Some(n) || n.strip_suffix('s') == Some(w))
    };
    // "US" and "United States": an acronym matches the words it abbreviates.
    let initials =
        |ws: &[String]| -> String { ws.iter().filter_map(|w| w.chars().next()).collect() };
    let abbreviates =
        |n: &str, other: &[String]| (2..=5).any(|k| other.windows(k).any(|run| initials(run) == n));
    let unmatched = |text: &str, other: &[String]| {
        let left: Vec<String> = names(text)
            .into_iter()
            .filter(|n| !mentions(other, n) && !abbreviates(n, other))
            .collect();
        let abbreviated = left.len() >= 2 && mentions(other, &initials(&left));
        !left.is_empty() && !abbreviated
    };
    unmatched(cached, b) && unmatched(asked, a)
}

/// Whether both measure time and in different units ("their first day" / "their first week");
/// a question without a unit ("how long") may be answered in any.
fn other_unit(a: &[String], b: &[String]) -> bool {
    let units = |ws: &[String]| -> std::collections::BTreeSet<String> {
        ws.iter()
            .map(|w| w.strip_suffix('s').unwrap_or(w))
            .filter(|w| TIME_UNITS.iter().any(|u| u.strip_suffix('s') == Some(*w)))
            .map(str::to_string)
            .collect()
    };
    let (ua, ub) = (units(a), units(b));
    !ua.is_empty() && !ub.is_empty() && ua != ub
}

fn negated(ws: &[String]) -> bool {
    ws.iter()
        .filter(|w| NEGATIONS.contains(&w.as_str()))
        .count()
        % 2
        == 1
}

/// Whether one side has a word whose opposite is on the other side (and not on its own).
fn swapped_opposite(a: &[String], b: &[String]) -> bool {
    let has = |ws: &[String], w: &str| match w.split_once(' ') {
        Some((x, y)) => ws.windows(2).any(|p| p[0] == x && p[1] == y),
        None => ws.iter().any(|x| x == w),
    };
    OPPOSITES.iter().any(|(x, y)| {
        (has(a, x) && has(b, y) && !has(a, y) && !has(b, x))
            || (has(a, y) && has(b, x) && !has(a, x) && !has(b, y))
    })
}

/// What `a` and `b` share at the start and at the end (how many items each), and what each has
/// between them.
fn differing<'a, T: PartialEq>(a: &'a [T], b: &'a [T]) -> (usize, usize, &'a [T], &'a [T]) {
    let prefix = a.iter().zip(b).take_while(|(x, y)| x == y).count();
    let suffix = a[prefix..]
        .iter()
        .rev()
        .zip(b[prefix..].iter().rev())
        .take_while(|(x, y)| x == y)
        .count();
    (
        prefix,
        suffix,
        &a[prefix..a.len() - suffix],
        &b[prefix..b.len() - suffix],
    )
}

/// The words that are not function words.
fn content_words(ws: &[String]) -> Vec<String> {
    ws.iter()
        .filter(|w| !STOPWORDS.contains(&w.as_str()))
        .cloned()
        .collect()
}

/// The sentences (or lines) of `text`, each as its words.
fn sentences(text: &str) -> Vec<Vec<String>> {
    text.split_inclusive(['\n', '.', '?', '!', ';'])
        .map(words)
        .filter(|ws| !ws.is_empty())
        .collect()
}

/// The words of the sentences where `cached` and `asked` differ: the sentences both share at
/// the start and the end are left out, so a template's fixed lines ("Q: ... / A: The author of
/// X is") do not make a reworded question look like one slot refilled.
fn differing_sentences(cached: &str, asked: &str) -> (Vec<String>, Vec<String>) {
    let (a, b) = (sentences(cached), sentences(asked));
    let (_, _, x, y) = differing(&a, &b);
    (x.concat(), y.concat())
}

/// Whether `b` is `a` with a small edit in place: the same words before and after it, and on
/// each side a few words that change a content word, or a direction.
fn edited_in_place(a: &[String], b: &[String]) -> bool {
    let (head, tail, x, y) = differing(a, b);
    let longer = a.len().max(b.len()).max(1);
    if x.len() > MAX_EDIT || y.len() > MAX_EDIT || ((head + tail) as f64) < MIN_KEPT * longer as f64
    {
        return false;
    }
    if x.is_empty() || y.is_empty() {
        // A content word put into the middle of the same sentence narrows or changes what it
        // names ("the square of 144" / "the square root of 144"); at either end it is more often
        // a courtesy or an adverb.
        let added = if x.is_empty() { y } else { x };
        let inside = !a.is_empty() && a.first() == b.first() && a.last() == b.last();
        return inside && added.len() <= 2 && !content_words(added).is_empty();
    }
    let direction = DIRECTIONS.iter().any(|(p, q)| {
        (x.iter().any(|w| w == p) && y.iter().any(|w| w == q))
            || (x.iter().any(|w| w == q) && y.iter().any(|w| w == p))
    });
    if direction {
        return true;
    }
    let (cx, cy) = (content_words(x), content_words(y));
    if cx.is_empty() || cy.is_empty() {
        return false;
    }
    let missing = |from: &[String], to: &[String]| from.iter().filter(|w| !to.contains(w)).count();
    match (missing(&cx, &cy), missing(&cy, &cx)) {
        // A content word on each side that the other lacks: a slot refilled ("France" /
        // "Germany").
        (1.., 1..) => true,
        // The same content words, moved among function words.
        (0, 0) => false,
        // Content words only added: a narrowing when they sit between content words both
        // share, whatever the function words around them ("what's the square" / "what is the
        // square root").
        _ => {
            let (ca, cb) = (content_words(a), content_words(b));
            let (head, tail, p, q) = differing(&ca, &cb);
            (p.is_empty() || q.is_empty()) && head > 0 && tail > 0 && p.len() + q.len() <= 2
        }
    }
}

/// Question words that ask for different things (a person, a time, a place, a reason).
const WH: &[(&str, &str)] = &[
    ("who", "who"),
    ("whom", "who"),
    ("whose", "who"),
    ("when", "when"),
    ("where", "where"),
    ("why", "why"),
];

const TIME_UNITS: &[&str] = &[
    "seconds", "minutes", "hours", "days", "weeks", "months", "quarters", "years", "nights",
];

/// Verbs a question word is followed by when it asks ("when is", "where do", "why did").
const AUXILIARIES: &[&str] = &[
    "is", "are", "was", "were", "do", "does", "did", "can", "could", "will", "would", "should",
    "shall", "may", "might", "must", "has", "have", "had", "isnt", "arent", "dont", "doesnt",
    "didnt", "cant", "wont", "s",
];

/// "how" with the word after it that asks for a measure ("how long" a duration, "how much" an
/// amount), and the kind it asks for ("how soon" is "when").
const HOW: &[(&str, &str)] = &[
    ("long", "how long"),
    ("much", "how much"),
    ("many", "how many"),
    ("often", "how often"),
    ("far", "how far"),
    ("old", "how old"),
    ("big", "how big"),
    ("large", "how big"),
    ("soon", "when"),
];

/// The kind of "where do I ...": both a place and a way.
const HOW_OR_WHERE: &str = "how or where";

/// Whether both ask with a question word of its own kind and the kinds differ ("who wrote" /
/// "when was it written", "how long does a refund take" / "how much is refunded").
fn other_question(a: &[String], b: &[String]) -> bool {
    let kinds = |ws: &[String]| -> std::collections::BTreeSet<&'static str> {
        ws.iter()
            .enumerate()
            .filter_map(|(i, w)| {
                let next = ws.get(i + 1).map(String::as_str);
                if w == "how" {
                    // "how many weeks", "how many PTO hours" ask for a duration.
                    let unit_follows = ws
                        .iter()
                        .skip(i + 2)
                        .take(4)
                        .any(|u| TIME_UNITS.contains(&u.as_str()));
                    if matches!(next, Some("many" | "much")) && unit_follows {
                        return Some("how long");
                    }
                    // "how do I", "how are invoices paid": the way of doing it.
                    if next.is_some_and(|n| AUXILIARIES.contains(&n)) {
                        return Some("how");
                    }
                    return HOW.iter().find(|(x, _)| Some(*x) == next).map(|(_, k)| *k);
                }
                // "what caused the outage" asks why it happened.
                if w == "what" && next.is_some_and(|n| matches!(n, "caused" | "causes" | "cause")) {
                    return Some("why");
                }
                let kind = WH.iter().find(|(x, _)| x == w).map(|(_, k)| *k)?;
                // "where do I enter a promo code", "where to file expenses" ask for a place and
                // for the way to do it, as "how do I" does; "where are the logs stored" asks for
                // a place only.
                let doer = ws.get(i + 2).map(String::as_str);
                if kind == "where"
                    && (next == Some("to")
                        || next.is_some_and(|n| AUXILIARIES.contains(&n))
                            && matches!(doer, Some("i" | "we" | "you")))
                {
                    return Some(HOW_OR_WHERE);
                }
                // A question word comes before its verb or an infinitive ("when is", "where
                // to", "who approved"); "what happens when I resign" and "when working from
                // home, is ..." ask no "when".
                let asks = next.is_some_and(|n| AUXILIARIES.contains(&n) || n == "to")
                    || matches!(kind, "who");
                asks.then_some(kind)
            })
            .collect()
    };
    let kinds = |ws: &[String]| {
        let mut k = kinds(ws);
        if k.remove(HOW_OR_WHERE) {
            k.extend(["how", "where"]);
        }
        k
    };
    // A question opening with its verb asks yes or no ("can I get admin rights" / "who approves
    // admin rights"), unless it wraps another question ("can you tell me how to ...") or is a
    // request ("could you walk me through ...").
    let kinds = |ws: &[String]| {
        let mut k = kinds(ws);
        let wraps = ws
            .iter()
            .any(|w| matches!(w.as_str(), "how" | "what" | "which" | "whats"));
        let opens_with_verb = ws
            .first()
            .is_some_and(|w| AUXILIARIES.contains(&w.as_str()));
        let request = ws.get(1).is_some_and(|w| w == "you");
        if k.is_empty() && !wraps && opens_with_verb && !request {
            k.insert("yes or no");
        }
        k
    };
    let (ka, kb) = (kinds(a), kinds(b));
    !ka.is_empty() && !kb.is_empty() && ka.is_disjoint(&kb)
}

/// Whether the same content words trade places in an otherwise identical sentence ("corporate
/// card for personal expenses" / "personal card for corporate expenses").
fn roles_swapped(a: &[String], b: &[String]) -> bool {
    let (head, tail, x, y) = differing(a, b);
    let kept = head + tail;
    let (cx, cy) = (content_words(x), content_words(y));
    let (mut sx, mut sy) = (cx.clone(), cy.clone());
    sx.sort();
    sy.sort();
    // The sentence around the swap must be the same (a reworded sentence reorders freely).
    let around = kept as f64 >= a.len().max(b.len()) as f64 / 3.0;
    around && cx.len() >= 2 && sx == sy && cx != cy
}

/// The first word after `marker` at or after `from` that is not a determiner, and where it is
/// ("from the US": "us" is a name here, not the pronoun).
fn slot_after(ws: &[String], marker: &str, from: usize) -> Option<(usize, String)> {
    const DETERMINERS: &[&str] = &["the", "a", "an", "my", "our", "your", "their", "his", "her"];
    let at = from + ws.iter().skip(from).position(|w| w == marker)?;
    ws.iter()
        .enumerate()
        .skip(at + 1)
        .find(|(_, w)| !DETERMINERS.contains(&w.as_str()))
        .map(|(i, w)| (i, w.clone()))
}

/// Whether a move "from X to Y" is "from Y to X" on the other side, however much else differs
/// ("from the EU to the US" / "from the US to the EU").
fn direction_reversed(a: &[String], b: &[String]) -> bool {
    let ends = |ws: &[String]| -> Option<(String, String)> {
        let (at, from) = slot_after(ws, "from", 0)?;
        let (_, to) = slot_after(ws, "to", at + 1)?;
        (from != to).then_some((from, to))
    };
    match (ends(a), ends(b)) {
        (Some((f1, t1)), Some((f2, t2))) => f1 == t2 && t1 == f2,
        _ => false,
    }
}

/// A pair to check: both texts and their words.
struct Pair<'s> {
    cached: &'s str,
    asked: &'s str,
    a: Vec<String>,
    b: Vec<String>,
}

/// The same numbers in another order in the same words: "is 7 greater than 3" / "is 3 greater
/// than 7".
fn numbers_reordered(p: &Pair) -> bool {
    let wording = |ws: &[String]| -> Vec<String> {
        ws.iter()
            .filter(|w| !w.chars().all(|c| c.is_ascii_digit()))
            .cloned()
            .collect()
    };
    digit_runs(p.cached) != digit_runs(p.asked) && wording(&p.a) == wording(&p.b)
}

/// A check, and the reason it gives when it refuses.
type Rule = (&'static str, fn(&Pair) -> bool);

/// The checks in the order they are tried.
const RULES: &[Rule] = &[
    ("numbers", |p| numbers(p.cached) != numbers(p.asked)),
    ("numbers", numbers_reordered),
    ("numbers", |p| other_unit(&p.a, &p.b)),
    ("numbers", |p| other_operation(p.cached, &p.a, &p.b)),
    ("negation", |p| {
        negated(&p.a) != negated(&p.b) || prefix_negated(&p.a, &p.b)
    }),
    ("opposite", |p| {
        swapped_opposite(&p.a, &p.b) || direction_reversed(&p.a, &p.b)
    }),
    ("edited in place", |p| {
        let (a, b) = differing_sentences(p.cached, p.asked);
        edited_in_place(&a, &b)
    }),
    ("roles swapped", |p| roles_swapped(&p.a, &p.b)),
    ("another question word", |p| other_question(&p.a, &p.b)),
    ("another name", |p| {
        other_name(p.cached, p.asked, &p.a, &p.b)
    }),
    ("another quoted term", |p| {
        both_differ(quoted, p.cached, p.asked)
    }),
    ("another list", |p| both_differ(listed, p.cached, p.asked)),
];

fn pair<'s>(cached: &'s str, asked: &'s str) -> Pair<'s> {
    Pair {
        cached,
        asked,
        a: words(cached),
        b: words(asked),
    }
}

/// Why `cached` and `asked` must not share an answer although they embed alike; None: they may.
pub fn refuses(cached: &str, asked: &str) -> Option<&'static str> {
    let p = pair(cached, asked);
    RULES.iter().find(|(_, rule)| rule(&p)).map(|(why, _)| *why)
}

/// Every reason the guard has to refuse the pair (`refuses` gives the first): what the cache
/// benchmark reports, to weigh each rule on labelled pairs.
pub fn all_refusals(cached: &str, asked: &str) -> Vec<&'static str> {
    let p = pair(cached, asked);
    let mut why: Vec<&'static str> = RULES
        .iter()
        .filter(|(_, rule)| rule(&p))
        .map(|(why, _)| *why)
        .collect();
    why.dedup();
    why
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_polarity_and_opposites_must_agree() {
        assert_eq!(refuses("What is 17 times 23?", "what's 17 times 23"), None);
        assert_eq!(
            refuses("What is 17 times 23?", "What is 17 times 24?"),
            Some("numbers")
        );
        assert_eq!(
            refuses("Budget for 2019", "Budget for the year 2020"),
            Some("numbers")
        );
        assert_eq!(refuses("a 1,000 limit", "a limit of 1000"), None);
        assert_eq!(refuses("version 3.1", "version 3.2"), Some("numbers"));
        assert_eq!(refuses("five days of leave", "5 days leave"), None);
        assert_eq!(
            refuses("Can I work remotely?", "Can't I work remotely?"),
            Some("negation")
        );
        assert_eq!(
            refuses(
                "Can I expense a taxi?",
                "Is it not possible to expense a taxi?"
            ),
            Some("negation")
        );
        assert_eq!(
            refuses("Coffee with milk", "Coffee without milk"),
            Some("negation")
        );
        assert_eq!(
            refuses("Is it allowed?", "Isn't it not allowed?"),
            None,
            "a double negation keeps the polarity"
        );
        assert_eq!(
            refuses("Submit before the deadline", "Submit after the deadline"),
            Some("opposite")
        );
        assert_eq!(
            refuses("How do I enable MFA?", "How do I disable MFA?"),
            Some("opposite")
        );
        assert_eq!(
            refuses(
                "How do I reset my VPN password?",
                "How can I reset the password for the VPN?"
            ),
            None
        );
        assert_eq!(
            refuses(
                "Can I use the corporate card for personal expenses?",
                "Can I use my personal card for corporate expenses?"
            ),
            Some("roles swapped")
        );
        assert_eq!(
            refuses("Who wrote Hamlet?", "When was Hamlet written?"),
            Some("another question word")
        );
        assert_eq!(
            refuses("Who wrote Hamlet?", "Hamlet was written by whom?"),
            None
        );
        assert_eq!(
            refuses("Is the kettle in stock?", "Is the kettle out of stock?"),
            Some("edited in place")
        );
        assert_eq!(
            refuses(
                "How do I reset my VPN password?",
                "How can I reset my VPN password?"
            ),
            None
        );
        assert_eq!(
            refuses(
                "What is the capital of France?",
                "What is the capital of Germany?"
            ),
            Some("edited in place")
        );
        assert_eq!(
            refuses(
                "What is the capital of France?",
                "Which city is the capital of France?"
            ),
            None
        );
        assert_eq!(
            refuses(
                "How do I reset my VPN password?",
                "What's the procedure to reset the password of my VPN, please?"
            ),
            None
        );
    }

    #[test]
    fn dates_names_prefixes_particles_and_question_kinds() {
        let refused = |a: &str, b: &str| refuses(a, b).is_some();
        // Calendar words and ordinals are numbers; time units must agree when both have one.
        assert!(refused("Outage on March 3", "Outage on April 3"));
        assert!(refused(
            "Is the office open on Friday?",
            "Is the office open on Saturday?"
        ));
        assert!(refused(
            "Printers on the third floor",
            "Printers on the fifth floor"
        ));
        assert!(refused(
            "What do I do on my first day?",
            "What do I do in my first week?"
        ));
        // Numbers that trade places, or change sign.
        assert!(refused("Is 7 greater than 3?", "Is 3 greater than 7?"));
        assert!(refused("What's 17 minus 5?", "What's 5 minus 17?"));
        assert!(refused("What is -3 squared?", "What is 3 squared?"));
        assert!(!refused(
            "How many COVID-19 cases were there in 2021?",
            "In 2021, how many COVID-19 cases were there?"
        ));
        assert!(!refused(
            "How many PTO hours for 3 days off on 10-hour shifts?",
            "On 10-hour shifts, how many PTO hours do 3 days off take?"
        ));
        assert!(!refused(
            "Was I charged twice this month?",
            "Did I get charged two times this month?"
        ));
        assert!(!refused(
            "You may leave early in May",
            "In May you may leave early"
        ));
        assert!(!refused(
            "How long is paid parental leave?",
            "For how many weeks is parental leave paid?"
        ));
        // Another name, however the rest is reworded; an acronym is the words it abbreviates.
        assert!(refused(
            "What's the fastest way to reset my Okta password?",
            "I need my Jira password reset, what's the quickest way?"
        ));
        assert!(!refused(
            "Does GDPR apply to data we store in the United States?",
            "If we store data in the US, does GDPR apply?"
        ));
        assert!(!refused(
            "What is the largest ocean on Earth?",
            "What's Earth's largest ocean?"
        ));
        // A negating prefix, a particle's opposite.
        assert!(refused(
            "Which expenses are reimbursable?",
            "Which expenses are non-reimbursable?"
        ));
        assert!(refused(
            "Is parental leave paid?",
            "Is parental leave unpaid?"
        ));
        assert!(refused(
            "How do I turn on auto replies?",
            "How can I turn off auto replies?"
        ));
        // Question kinds: yes or no, a way, a duration, an amount; requests and clauses ask none.
        assert!(refused(
            "Can I get admin rights?",
            "Who approves admin rights?"
        ));
        assert!(refused("When are invoices paid?", "How are invoices paid?"));
        assert!(refused(
            "How long does shipping take?",
            "How much does shipping cost?"
        ));
        assert!(!refused(
            "How do I map the shared drive?",
            "Could you walk me through mapping the shared drive?"
        ));
        assert!(!refused(
            "Is the VPN required when working from home?",
            "When working from home, is the VPN mandatory?"
        ));
        assert!(!refused(
            "What is the notice period when I resign?",
            "If I resign, how long is my notice period?"
        ));
    }

    #[test]
    fn roman_numerals_insertions_reversed_moves_and_causes() {
        assert_eq!(
            refuses("When did World War II end?", "When did World War I end?"),
            Some("numbers")
        );
        assert_eq!(
            refuses(
                "What were the results of the Phase III trial?",
                "How did the Phase III trial turn out?"
            ),
            None
        );
        assert_eq!(refuses("Do I need a CV?", "Is a CV needed?"), None);
        assert_eq!(
            refuses(
                "What is the square root of 144?",
                "What is the square of 144?"
            ),
            Some("edited in place")
        );
        assert_eq!(
            refuses(
                "How do I reset my password?",
                "How do I reset my password quickly?"
            ),
            None,
            "a word added at an end is not a narrowed slot"
        );
        assert_eq!(
            refuses(
                "How do I move money from savings to my checking account?",
                "Can I move money from checking to savings?"
            ),
            Some("opposite")
        );
        assert_eq!(
            refuses(
                "Can we transfer personal data from the EU to the US?",
                "Can we transfer personal data from the US to the EU?"
            ),
            Some("opposite")
        );
        assert_eq!(
            refuses(
                "What caused the outage on March 3?",
                "How long did the outage on March 3 last?"
            ),
            Some("another question word")
        );
        assert_eq!(
            refuses(
                "What caused the outage on March 3?",
                "Why did the outage on March 3 happen?"
            ),
            None
        );
    }

    #[test]
    fn template_lines_and_moved_words_are_not_a_refilled_slot() {
        // A completion template's fixed answer line is left out of the comparison: the question
        // line alone is reworded too much to be one slot refilled.
        assert_eq!(
            refuses(
                "Q: Who wrote Dracula?\nA: Dracula was written by",
                "Q: Who is the author of Dracula?\nA: Dracula was written by"
            ),
            None
        );
        assert_eq!(
            refuses(
                "Q: How many vacation days do new employees get?\nA: New employees get",
                "Q: How many vacation days do managers get?\nA: New employees get"
            ),
            Some("edited in place")
        );
        // The same content word moved among function words, a word added at the start.
        assert_eq!(
            refuses(
                "The French word for \"dog\" is \"",
                "In French, the word for \"dog\" is \""
            ),
            None
        );
        assert_eq!(
            refuses(
                "The French word for \"dog\" is \"",
                "Translated into French, the word for \"dog\" is \""
            ),
            None
        );
        assert_eq!(
            refuses(
                "The French word for \"dog\" is \"",
                "The Spanish word for \"dog\" is \""
            ),
            Some("edited in place")
        );
        // Added between shared content words, beside a function word changed: a narrowing.
        assert_eq!(
            refuses(
                "Who approves the travel budget?",
                "Who approves a travel expense budget?"
            ),
            Some("edited in place")
        );
    }

    #[test]
    fn where_to_do_it_asks_how_to_do_it() {
        assert_eq!(
            refuses("How do I track my package?", "where can I track my parcel"),
            None
        );
        assert_eq!(
            refuses(
                "How do I apply a discount code at checkout?",
                "where to enter a promo code when paying"
            ),
            None
        );
        assert_eq!(
            refuses(
                "Where can I find the employee handbook?",
                "where is the staff handbook located"
            ),
            None
        );
        // A place, not a way.
        assert_eq!(
            refuses(
                "How do I install TensorBoard?",
                "Where does TensorBoard store its log files?"
            ),
            Some("another question word")
        );
        assert_eq!(
            refuses("How do I file Form 941?", "When is Form 941 due?"),
            Some("another question word")
        );
    }

    #[test]
    fn quoted_terms_and_operations_must_agree() {
        assert_eq!(
            refuses(
                "In French, the word for \"dog\" is \"",
                "The French word for \"book\" is \""
            ),
            Some("another quoted term")
        );
        assert_eq!(
            refuses(
                "The opposite of \"big\" is \"",
                "The word opposite in meaning to \"long\" is \""
            ),
            Some("another quoted term")
        );
        assert_eq!(
            refuses("What does `git stash` do?", "what is `git stash` for"),
            None
        );
        assert_eq!(
            refuses(
                "Why does Outlook say \"Updating inbox\"?",
                "outlook keeps saying updating inbox, why"
            ),
            None
        );
        assert_eq!(
            refuses(
                "Q: Compute 9 plus 9, please.\nA: 9 plus 9 is",
                "Q: What is 9 times 9?\nA: 9 times 9 is"
            ),
            Some("numbers")
        );
        assert_eq!(refuses("What is 9 plus 3?", "add 9 and 3"), None);
    }

    #[test]
    fn listed_items_must_agree() {
        assert_eq!(
            refuses(
                "Continue the list: A, B, C, D,",
                "Continue the list: do, re, mi, fa,"
            ),
            Some("another list")
        );
        assert_eq!(
            refuses(
                "Continue the list: do, re, mi, fa,",
                "Continue this list: do, re, mi, fa,"
            ),
            None
        );
        // Items in another order are the same list.
        assert!(!both_differ(
            listed,
            "Can I install Slack, Zoom, Teams on my laptop?",
            "am I allowed to put zoom, teams, slack on the work laptop"
        ));
        assert_eq!(
            listed("Continue the list: spring, summer, autumn,"),
            ["autumn", "spring", "summer"]
        );
        // A clause's commas with longer parts are no list.
        assert!(listed("If the VPN drops, what should I do, and who do I call?").is_empty());
    }
}
