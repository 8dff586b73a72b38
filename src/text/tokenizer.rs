//! Tokenizers built from GGUF metadata (`tokenizer.ggml.*`) with the `tokenizers` crate, or loaded from a
//! `tokenizer.json`. Two GGUF families: byte-level BPE (`gpt2`, with merges) and SentencePiece-style
//! (`llama`, with scores and byte-fallback tokens, no merges).
use ahash::AHashMap;

use candle_core::quantized::gguf_file::{Content, Value};
use tokenizers::decoders::byte_fallback::ByteFallback;
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::decoders::fuse::Fuse;
use tokenizers::decoders::sequence::Sequence as DecoderSequence;
use tokenizers::models::bpe::BPE;
use tokenizers::normalizers::replace::Replace;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence as PreSequence;
use tokenizers::{AddedToken, DecoderWrapper, PreTokenizerWrapper, Tokenizer as HfTokenizer};

use std::sync::Arc;

use aho_corasick::{AhoCorasick, MatchKind};

use super::chat::{CONTENT_CLOSE, CONTENT_OPEN};
use crate::error::{HearthError, Result};

/// GGUF token types (llama.cpp's `llama_token_type`).
const TOKEN_TYPE_CONTROL: i32 = 3;
const TOKEN_TYPE_USER_DEFINED: i32 = 4;

/// Where an incremental decode (`Tokenizer::decode_step`) stands: the window of recent ids and the
/// text they were last decoded to.
#[derive(Debug, Default, Clone)]
pub struct DecodeState {
    ids: Vec<u32>,
    prefix: String,
    prefix_index: usize,
}

impl DecodeState {
    /// Ids not yet turned into text (an incomplete character at the end of generation).
    pub fn undecoded(&self) -> &[u32] {
        &self.ids[self.prefix_index.min(self.ids.len())..]
    }

    /// The text the window decodes to so far.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The window's ids.
    pub fn ids(&self) -> &[u32] {
        &self.ids
    }
}

/// A tokenizer plus the special ids the engine needs.
#[derive(Clone)]
pub struct Tokenizer {
    inner: HfTokenizer,
    /// The same tokenizer with special tokens read as plain text, built on first need.
    plain: std::sync::OnceLock<HfTokenizer>,
    /// Finds special-token strings in text.
    specials: Arc<AhoCorasick>,
    /// No token's text spans more characters than this (an upper bound).
    max_token_chars: usize,
    /// Token ids are below this (added tokens included). Kept: the library counts it by building
    /// the whole vocabulary map, ~1 ms for Gemma's 262k tokens, on every request it was asked.
    vocab_size: usize,
    pub bos_id: Option<u32>,
    pub eos_ids: Vec<u32>,
    pub add_bos: bool,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("vocab", &self.inner.get_vocab_size(true))
            .field("bos_id", &self.bos_id)
            .field("eos_ids", &self.eos_ids)
            .finish()
    }
}

fn tok_err(e: impl std::fmt::Display) -> HearthError {
    HearthError::Tokenizer(e.to_string())
}

fn md<'a>(ct: &'a Content, key: &str) -> Result<&'a Value> {
    ct.metadata
        .get(key)
        .ok_or_else(|| HearthError::MissingMetadata(key.to_string()))
}

fn md_u32(ct: &Content, key: &str) -> Option<u32> {
    ct.metadata.get(key).and_then(|v| v.to_u32().ok())
}

fn md_bool(ct: &Content, key: &str) -> Option<bool> {
    ct.metadata.get(key).and_then(|v| v.to_bool().ok())
}

fn string_array(ct: &Content, key: &str) -> Result<Vec<String>> {
    let arr = md(ct, key)?.to_vec().map_err(tok_err)?;
    arr.iter()
        .map(|v| v.to_string().cloned().map_err(tok_err))
        .collect()
}

fn num_array<T>(ct: &Content, key: &str, f: impl Fn(&Value) -> Option<T>) -> Result<Vec<T>> {
    let arr = md(ct, key)?.to_vec().map_err(tok_err)?;
    arr.iter()
        .map(|v| f(v).ok_or_else(|| tok_err(format!("bad element in {key}"))))
        .collect()
}

impl Tokenizer {
    pub fn from_gguf(ct: &Content) -> Result<Self> {
        let model = md(ct, "tokenizer.ggml.model")?
            .to_string()
            .map_err(tok_err)?
            .clone();
        let tokens = string_array(ct, "tokenizer.ggml.tokens")?;
        let types = num_array(ct, "tokenizer.ggml.token_type", |v| v.to_i32().ok())
            .unwrap_or_else(|_| vec![1; tokens.len()]);
        let mut inner = match model.as_str() {
            "gpt2" => byte_level_bpe(ct, &tokens)?,
            "llama" => sentencepiece_bpe(ct, &tokens)?,
            other => {
                return Err(HearthError::Tokenizer(format!(
                    "unsupported GGUF tokenizer model `{other}` (supported: gpt2, llama)"
                )))
            }
        };
        // Control tokens (<|im_start|>, <start_of_turn>, ...) and user-defined ones must match as whole
        // tokens in the text, as llama.cpp and HF do, or chat prompts would be split into pieces.
        let mut specials = Vec::new();
        let mut user = Vec::new();
        for (tok, ty) in tokens.iter().zip(types.iter()) {
            match *ty {
                TOKEN_TYPE_CONTROL => specials.push(AddedToken::from(tok.clone(), true)),
                TOKEN_TYPE_USER_DEFINED => user.push(AddedToken::from(tok.clone(), false)),
                _ => {}
            }
        }
        inner.add_special_tokens(specials).map_err(tok_err)?;
        inner.add_tokens(user).map_err(tok_err)?;

        let bos_id = md_u32(ct, "tokenizer.ggml.bos_token_id");
        let mut eos_ids: Vec<u32> = md_u32(ct, "tokenizer.ggml.eos_token_id")
            .into_iter()
            .collect();
        if let Some(eot) = md_u32(ct, "tokenizer.ggml.eot_token_id") {
            eos_ids.push(eot);
        }
        // Chat turns end with a dedicated token that some files do not list as EOS.
        for end in ["<|im_end|>", "<end_of_turn>", "<|eot_id|>", "<|endoftext|>"] {
            if let Some(id) = inner.token_to_id(end) {
                if !eos_ids.contains(&id) {
                    eos_ids.push(id);
                }
            }
        }
        let add_bos = md_bool(ct, "tokenizer.ggml.add_bos_token").unwrap_or(model == "llama");
        // Token strings are in the model's own alphabet (byte-level: one char per byte; SentencePiece:
        // one char per char, `<0xNN>` for a byte), never shorter than the text they stand for.
        Self::new(inner, bos_id, eos_ids, add_bos, 1)
    }

    fn new(
        inner: HfTokenizer,
        bos_id: Option<u32>,
        eos_ids: Vec<u32>,
        add_bos: bool,
        chars_factor: usize,
    ) -> Result<Self> {
        let specials: Vec<String> = inner
            .get_added_tokens_decoder()
            .values()
            .filter(|t| t.special && !t.content.is_empty())
            .map(|t| t.content.clone())
            .collect();
        let specials = AhoCorasick::builder()
            .match_kind(MatchKind::LeftmostLongest)
            .build(&specials)
            .map_err(tok_err)?;
        let vocab = inner.get_vocab(true);
        let longest = vocab.keys().map(|k| k.chars().count()).max().unwrap_or(1);
        let vocab_size = vocab.len();
        Ok(Self {
            inner,
            vocab_size,
            plain: std::sync::OnceLock::new(),
            specials: Arc::new(specials),
            max_token_chars: longest.max(1) * chars_factor,
            bos_id,
            eos_ids,
            add_bos,
        })
    }

    /// A `tokenizer.json` (safetensors checkpoints); BOS handling is left to its post-processor.
    pub fn from_file(path: &std::path::Path, bos: Option<&str>, eos: &[&str]) -> Result<Self> {
        let inner = HfTokenizer::from_file(path).map_err(tok_err)?;
        let bos_id = bos.and_then(|b| inner.token_to_id(b));
        let eos_ids = eos.iter().filter_map(|e| inner.token_to_id(e)).collect();
        // A tokenizer.json may normalize (NFC can fold two characters into one), so its token
        // strings bound the text they cover less tightly: allow four characters for each.
        Self::new(inner, bos_id, eos_ids, false, 4)
    }

    /// An upper bound on the characters of text one token covers.
    pub fn max_token_chars(&self) -> usize {
        self.max_token_chars
    }

    /// The first special token's text in `text`, if any.
    pub fn find_special<'a>(&self, text: &'a str) -> Option<&'a str> {
        self.specials.find(text).map(|m| &text[m.range()])
    }

    /// Token ids of a chat prompt from `ChatTemplate::render_marked`: special tokens are recognised
    /// only where the template wrote them; inside message content, text such as `<|im_start|>`
    /// stays text. Equal to `encode` of the unmarked text whenever the content holds no special
    /// token's string.
    pub fn encode_chat(&self, marked: &str) -> Result<Vec<u32>> {
        let forged = marked.split(CONTENT_OPEN).skip(1).any(|seg| {
            self.specials
                .is_match(seg.split(CONTENT_CLOSE).next().unwrap_or(""))
        });
        if !forged {
            return self.encode(&marked.replace([CONTENT_OPEN, CONTENT_CLOSE], ""));
        }
        // Split at the specials outside the marks; each stretch between them (template text and
        // content together, as a whole-text encode would see it) is encoded with specials as text.
        let mut ids = Vec::new();
        let mut stretch = String::new();
        let mut inside = false;
        let mut rest = marked;
        while !rest.is_empty() {
            if inside {
                let end = rest.find(CONTENT_CLOSE).ok_or_else(|| {
                    HearthError::ChatTemplate("the template split a message's content".into())
                })?;
                stretch.push_str(&rest[..end]);
                rest = &rest[end + CONTENT_CLOSE.len_utf8()..];
                inside = false;
                continue;
            }
            let end = rest.find(CONTENT_OPEN).unwrap_or(rest.len());
            let outside = &rest[..end];
            let mut at = 0;
            for m in self.specials.find_iter(outside) {
                stretch.push_str(&outside[at..m.start()]);
                self.encode_plain(&stretch, &mut ids)?;
                stretch.clear();
                let tok = &outside[m.start()..m.end()];
                ids.extend(self.inner.token_to_id(tok));
                at = m.end();
            }
            stretch.push_str(&outside[at..]);
            rest = &rest[end..];
            if let Some(r) = rest.strip_prefix(CONTENT_OPEN) {
                rest = r;
                inside = true;
            }
        }
        self.encode_plain(&stretch, &mut ids)?;
        if let (true, Some(bos)) = (self.add_bos, self.bos_id) {
            if ids.first() != Some(&bos) {
                ids.insert(0, bos);
            }
        }
        Ok(ids)
    }

    fn encode_plain(&self, text: &str, ids: &mut Vec<u32>) -> Result<()> {
        if text.is_empty() {
            return Ok(());
        }
        let plain = self.plain.get_or_init(|| {
            let mut t = self.inner.clone();
            t.set_encode_special_tokens(true);
            t
        });
        let enc = plain.encode_fast(text, false).map_err(tok_err)?;
        ids.extend_from_slice(enc.get_ids());
        Ok(())
    }

    /// Token ids of `text`; special tokens written in the text are recognised (chat templates rely on it).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self.inner.encode_fast(text, false).map_err(tok_err)?;
        let mut ids = Vec::with_capacity(enc.len() + 1);
        if let (true, Some(bos)) = (self.add_bos, self.bos_id) {
            // A chat template may already have written the BOS token into the text.
            if enc.get_ids().first() != Some(&bos) {
                ids.push(bos);
            }
        }
        ids.extend_from_slice(enc.get_ids());
        Ok(ids)
    }

    /// Token ids of a piece of text that continues an output (no BOS).
    pub fn encode_continuation(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self.inner.encode_fast(text, false).map_err(tok_err)?;
        Ok(enc.get_ids().to_vec())
    }

    /// The next piece of text after `id` in a stream of generated tokens (None while a character is
    /// incomplete): decodes only a short window of recent ids, so a whole output costs linear time.
    pub fn decode_step(&self, id: u32, st: &mut DecodeState) -> Result<Option<String>> {
        tokenizers::tokenizer::step_decode_stream(
            &self.inner,
            vec![id],
            true,
            &mut st.ids,
            &mut st.prefix,
            &mut st.prefix_index,
        )
        .map_err(tok_err)
    }

    /// Text of `ids` with special tokens left out.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner.decode(ids, true).map_err(tok_err)
    }

    /// Write the tokenizer as a Hugging Face `tokenizer.json`.
    pub fn save_json(&self, path: &std::path::Path) -> Result<()> {
        self.inner.save(path, false).map_err(tok_err)
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// Every token's bytes, by id (special tokens marked with a 0xFF first byte, as llguidance
    /// expects), read from the tokenizer's own description so byte-level and byte-fallback
    /// vocabularies both come out as the bytes the model emits.
    pub fn token_bytes(&self) -> Result<Vec<Vec<u8>>> {
        let json = self.inner.to_string(false).map_err(tok_err)?;
        let value: serde_json::Value = serde_json::from_str(&json).map_err(tok_err)?;
        let mut words = llguidance::token_bytes_from_tokenizer_json(&value).map_err(tok_err)?;
        words.resize(words.len().max(self.vocab_size), Vec::new());
        Ok(words)
    }

    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    pub fn is_eos(&self, id: u32) -> bool {
        self.eos_ids.contains(&id)
    }
}

fn vocab_map(tokens: &[String]) -> AHashMap<String, u32> {
    tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.clone(), i as u32))
        .collect()
}

/// GPT-2 style byte-level BPE. Digits are split one by one first, as SmolLM2's and Llama 3's
/// pre-tokenizers do, and no prefix space is added.
fn byte_level_bpe(ct: &Content, tokens: &[String]) -> Result<HfTokenizer> {
    let merges = string_array(ct, "tokenizer.ggml.merges")?;
    let merges = merges
        .iter()
        .map(|m| {
            m.split_once(' ')
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .ok_or_else(|| tok_err(format!("malformed merge `{m}`")))
        })
        .collect::<Result<Vec<_>>>()?;
    let bpe = BPE::builder()
        .vocab_and_merges(vocab_map(tokens), merges)
        .build()
        .map_err(tok_err)?;
    let mut tk = HfTokenizer::new(bpe);
    let pre = ct
        .metadata
        .get("tokenizer.ggml.pre")
        .and_then(|v| v.to_string().ok().cloned())
        .unwrap_or_default();
    let byte_level = PreTokenizerWrapper::ByteLevel(ByteLevel::new(false, false, true));
    let pre_tok = match pre.as_str() {
        // These vocabularies were trained with every digit its own pre-token.
        "smollm" | "llama3" | "llama-bpe" | "qwen2" | "deepseek-llm" => {
            PreTokenizerWrapper::Sequence(PreSequence::new(vec![
                PreTokenizerWrapper::Digits(Digits::new(true)),
                byte_level,
            ]))
        }
        _ => byte_level,
    };
    tk.with_pre_tokenizer(Some(pre_tok));
    tk.with_decoder(Some(DecoderWrapper::ByteLevel(ByteLevelDecoder::default())));
    Ok(tk)
}

/// SentencePiece-style BPE: spaces become `▁`, unknown characters fall back to `<0xNN>` byte tokens, and
/// merges are rebuilt from the piece scores (a pair merges when the merged piece is in the vocabulary;
/// higher-scoring pieces merge first).
fn sentencepiece_bpe(ct: &Content, tokens: &[String]) -> Result<HfTokenizer> {
    let scores = num_array(ct, "tokenizer.ggml.scores", |v| v.to_f32().ok())?;
    if scores.len() != tokens.len() {
        return Err(tok_err("tokenizer.ggml.scores and tokens differ in length"));
    }
    let vocab = vocab_map(tokens);
    let mut order: Vec<usize> = (0..tokens.len()).collect();
    order.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]).then(a.cmp(&b)));
    let mut merges = Vec::new();
    for &id in &order {
        let piece = &tokens[id];
        if piece.chars().count() < 2 {
            continue;
        }
        let mut splits: Vec<(usize, usize, usize)> = Vec::new();
        for (pos, _) in piece.char_indices().skip(1) {
            let (a, b) = piece.split_at(pos);
            if let (Some(&ia), Some(&ib)) = (vocab.get(a), vocab.get(b)) {
                splits.push((ia as usize, ib as usize, pos));
            }
        }
        // Among splits of one piece, the pair of better-ranked halves merges first (as HF's converter).
        splits.sort_by_key(|&(ia, ib, _)| (ia, ib));
        for (_, _, pos) in splits {
            let (a, b) = piece.split_at(pos);
            merges.push((a.to_string(), b.to_string()));
        }
    }
    let unk = md_u32(ct, "tokenizer.ggml.unknown_token_id")
        .and_then(|id| tokens.get(id as usize).cloned())
        .unwrap_or_else(|| "<unk>".to_string());
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .unk_token(unk)
        .byte_fallback(true)
        .fuse_unk(true)
        .build()
        .map_err(tok_err)?;
    let mut tk = HfTokenizer::new(bpe);
    let add_prefix = md_bool(ct, "tokenizer.ggml.add_space_prefix").unwrap_or(true);
    let space = Replace::new(" ", "▁").map_err(tok_err)?;
    if add_prefix {
        tk.with_normalizer(Some(tokenizers::NormalizerWrapper::Sequence(
            tokenizers::normalizers::Sequence::new(vec![
                tokenizers::NormalizerWrapper::Prepend(tokenizers::normalizers::Prepend::new(
                    "▁".to_string(),
                )),
                tokenizers::NormalizerWrapper::Replace(space),
            ]),
        )))
        .map_err(tok_err)?;
    } else {
        tk.with_normalizer(Some(tokenizers::NormalizerWrapper::Replace(space)))
            .map_err(tok_err)?;
    }
    let decoder = DecoderSequence::new(vec![
        DecoderWrapper::Replace(Replace::new("▁", " ").map_err(tok_err)?),
        DecoderWrapper::ByteFallback(ByteFallback::new()),
        DecoderWrapper::Fuse(Fuse::new()),
    ]);
    tk.with_decoder(Some(DecoderWrapper::Sequence(decoder)));
    Ok(tk)
}
