"""A tiny byte-level BPE tokenizer shared by the calibration, evaluation, CLI and recovery tests."""

from __future__ import annotations

SENTENCES = (
    "The quick brown fox jumps over the lazy dog. A lazy dog sleeps in the sun while the fox runs.\n"
    "Question: how do you keep a dog cool? Answer: give it water and shade.\n"
)


def tiny_tokenizer(text: str = SENTENCES, vocab_size: int = 300):
    """LLaMA-like BPE tokenizer trained on ``text``: prepends ``<s>`` (BOS), ends with ``</s>`` (EOS).

    BOS is prepended to single texts and pairs, so the BOS paths of both perplexity protocols are exercised.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([text], trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tok.token_to_id("<s>"))]
    )
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")
