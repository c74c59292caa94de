"""A tiny, randomly initialised causal LM and its tokenizer, built locally (no downloads).

The tokenizer is byte-level BPE trained on a few sentences (so any text encodes), with a
simple chat template; the model is a two-layer Llama with 32-wide hidden states. Its output is
gibberish, but deterministic under greedy decoding, which is all the tests need.
"""

from __future__ import annotations

from pathlib import Path

CORPUS = [
    "hello there, how are you today?",
    "the quick brown fox jumps over the lazy dog",
    "local models answer questions without a network",
    "structured concurrency keeps every task owned by its request",
] * 20
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
SPECIALS = ["<|pad|>", "<|bos|>", "<|eos|>", "<|system|>", "<|user|>", "<|assistant|>"]


def build_tiny_model(path: Path, *, endless: bool = False, seed: int = 0) -> Path:
    """Write a tokenizer and model to ``path`` (created). ``endless``: the model never emits
    its end-of-sequence token (its generation config suppresses it), so generations run to
    ``max_new_tokens``."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import (
        GenerationConfig,
        LlamaConfig,
        LlamaForCausalLM,
        PreTrainedTokenizerFast,
    )

    path.mkdir(parents=True, exist_ok=True)
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    # The alphabet is the corpus's (ASCII): every token decodes to whole characters, so the
    # tests can compare texts exactly. (Real byte-level vocabularies split characters; the
    # connection's incremental decoding handles that, see tests/local/test_decoding.py.)
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=SPECIALS)
    bpe.train_from_iterator(CORPUS, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, bos_token="<|bos|>", eos_token="<|eos|>", pad_token="<|pad|>"
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(path)

    eos = tokenizer.convert_tokens_to_ids("<|eos|>")
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        # Room for generations long enough to outlast socket buffers (cancellation tests).
        max_position_embeddings=40_000,
        bos_token_id=tokenizer.convert_tokens_to_ids("<|bos|>"),
        eos_token_id=eos,
        pad_token_id=tokenizer.convert_tokens_to_ids("<|pad|>"),
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    generation = GenerationConfig(
        bos_token_id=config.bos_token_id, eos_token_id=eos, pad_token_id=config.pad_token_id
    )
    if endless:
        generation.suppress_tokens = [eos]
    model.generation_config = generation
    model.save_pretrained(path)
    return path
