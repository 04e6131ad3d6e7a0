"""Offline tokenizers for the tiny flavour: real CLIP / T5 tokenizer classes over small vocabularies.

Built in code from fixed character sets, so they never touch the network and are identical on every
machine. They save and reload with `save_pretrained` / `from_pretrained` like the real ones.
"""

from __future__ import annotations

import string

from tokenizers import pre_tokenizers
from transformers import CLIPTokenizer, T5TokenizerFast

CLIP_BOS, CLIP_EOS = "<|startoftext|>", "<|endoftext|>"
T5_PAD, T5_EOS, T5_UNK = "<pad>", "</s>", "<unk>"
# Whole words the tiny T5 knows, so common prompt words are one token rather than many.
_T5_WORDS = (
    "a an the of and in on with photo picture painting drawing portrait style person man woman dog cat "
    "red green blue white black tree house car sky water sks ohwx"
).split()


def clip_tokenizer(max_length: int) -> CLIPTokenizer:
    """Byte-level BPE with no merges: every byte is a token, with and without CLIP's '</w>' ending."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {CLIP_BOS: 0, CLIP_EOS: 1}
    for symbol in alphabet + [s + "</w>" for s in alphabet]:
        vocab[symbol] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=max_length)


def t5_tokenizer(max_length: int) -> T5TokenizerFast:
    """Unigram over characters plus a few whole words, SentencePiece-style ('▁' marks a word start)."""
    pieces = [(T5_PAD, 0.0), (T5_EOS, 0.0), (T5_UNK, 0.0), ("▁", -2.0)]
    pieces += [("▁" + w, -3.0) for w in _T5_WORDS]
    chars = string.ascii_letters + string.digits + string.punctuation
    pieces += [(c, -5.0) for c in chars] + [("▁" + c, -5.5) for c in chars]
    return T5TokenizerFast(vocab=pieces, extra_ids=0, model_max_length=max_length)
