"""Tiny random causal LMs and a byte-level BPE tokenizer, built in memory for fast offline tests; and small
data files (CSV, TSV, JSONL, Parquet) written from rows, as a user would give them to ``predict --file``."""

from __future__ import annotations

import csv
import functools
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    Gemma3TextConfig,
    GPT2Config,
    GPTNeoXConfig,
    LlamaConfig,
    OPTConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

ARCHITECTURES = ("llama", "gpt2", "qwen2", "gemma3_text", "opt", "gpt_neox")

_CORPUS = [
    "input: a gripping, funny and moving film output: positive",
    "input: dull, lifeless and far too long output: negative",
    "Review: the best movie of the year\nSentiment: positive",
    "Review: a waste of time\nSentiment: negative",
    "the plot is thin but the actors shine; neutral, mixed, great, bad, terrible, wonderful",
    "sports business politics tech entertainment world news science",
]


TOKENIZER_FAMILIES = ("bytelevel_bpe", "metaspace_bpe", "wordpiece")


@functools.cache
def tiny_tokenizer(family: str = "bytelevel_bpe") -> PreTrainedTokenizerFast:
    """A small tokenizer trained in memory on a tiny corpus.

    Families: ``bytelevel_bpe`` (GPT-2/SmolLM2/Qwen style: leading-space tokens, every byte
    representable), ``metaspace_bpe`` (SentencePiece/Llama/Gemma style ``▁`` word starts, unknown
    characters become ``<unk>``), ``wordpiece`` (BERT style: whitespace dropped, ``##`` pieces).
    """
    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    if family == "bytelevel_bpe":
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials, show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    elif family == "metaspace_bpe":
        tok = Tokenizer(models.BPE(unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
        tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
        trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials, show_progress=False)
    elif family == "wordpiece":
        tok = Tokenizer(models.WordPiece(unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.Whitespace()
        tok.decoder = decoders.WordPiece()
        trainer = trainers.WordPieceTrainer(vocab_size=400, special_tokens=specials, show_progress=False)
    else:
        raise ValueError(f"unknown tokenizer family {family!r}; known: {', '.join(TOKENIZER_FAMILIES)}")
    tok.train_from_iterator(_CORPUS * 4, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


def tiny_config(arch: str, vocab_size: int):
    """A 2-layer, hidden-32 config of the given architecture, dropout off (training is deterministic)."""
    common = dict(vocab_size=vocab_size, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if arch == "llama":
        return LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, **common)
    if arch == "qwen2":
        return Qwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, **common)
    if arch == "gemma3_text":
        return Gemma3TextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                sliding_window=16, **common)
    if arch == "gpt2":
        return GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=512,
                          resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **common)
    if arch == "opt":
        return OPTConfig(hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
                         max_position_embeddings=512, word_embed_proj_dim=32,
                         dropout=0.0, attention_dropout=0.0, **common)
    if arch == "gpt_neox":
        return GPTNeoXConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=4, max_position_embeddings=512, **common)
    raise ValueError(f"unknown tiny architecture {arch!r}; known: {', '.join(ARCHITECTURES)}")


def tiny_model(arch: str = "llama", seed: int = 0, dtype: torch.dtype = torch.float32):
    """A randomly initialised tiny causal LM in eval mode (dropout off)."""
    torch.manual_seed(seed)
    config = tiny_config(arch, len(tiny_tokenizer()))
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


def save_tiny_model(path, arch: str = "llama"):
    """Save a tiny model and its tokenizer as a ``save_pretrained`` folder (a local model for the CLI)."""
    tiny_model(arch).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


def biased_gpt2(word: str, nats: float = 30.0, seed: int = 0):
    """A tiny GPT-2 (``seed``) with its final LayerNorm's bias moved along the (tied) output row of
    ``word``'s first token (after a space): that token's logit gains ``nats`` after every input,
    whatever the input, so a classifier with ``word`` as a label word gives that label to everything."""
    model = tiny_model("gpt2", seed=seed)
    token = tiny_tokenizer()(" " + word, add_special_tokens=False).input_ids[0]
    row = model.lm_head.weight[token].detach()  # (d,)
    with torch.no_grad():
        model.transformer.ln_f.bias += nats * row / row.dot(row)
    return model


def write_rows(path: Path, rows: list[dict]) -> None:
    """Write ``rows`` (dicts with the first row's keys) in the format of ``path``'s suffix: CSV/TSV cells as
    text, JSONL typed, anything else as Parquet (typed)."""
    columns = list(rows[0])
    if path.suffix in (".csv", ".tsv"):
        with open(path, "w", encoding="utf-8", newline="") as f:
            writer = csv.writer(f, delimiter="\t" if path.suffix == ".tsv" else ",", lineterminator="\n")
            writer.writerow(columns)
            writer.writerows([[str(row[c]) for c in columns] for row in rows])
    elif path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    else:
        pq.write_table(pa.Table.from_pylist(rows), path)
