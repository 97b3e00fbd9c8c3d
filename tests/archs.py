"""Tiny random-init models of every architecture we claim, built offline."""
from __future__ import annotations

import torch
import transformers as tf

VOCAB = 96


def _lm(cfg_cls, model_cls, **kw):
    def build():
        torch.manual_seed(0)
        cfg = cfg_cls(**kw)
        cfg.use_cache = False
        return getattr(tf, model_cls)(cfg).eval()
    return build


COMMON = dict(vocab_size=VOCAB, hidden_size=48, intermediate_size=64, num_hidden_layers=2)

ARCHS = {
    "llama-mha": _lm(tf.LlamaConfig, "LlamaForCausalLM", num_attention_heads=4, num_key_value_heads=4,
                     tie_word_embeddings=False, **COMMON),
    "llama-gqa": _lm(tf.LlamaConfig, "LlamaForCausalLM", num_attention_heads=6, num_key_value_heads=2,
                     tie_word_embeddings=True, **COMMON),
    "qwen2": _lm(tf.Qwen2Config, "Qwen2ForCausalLM", num_attention_heads=4, num_key_value_heads=2, **COMMON),
    "mistral": _lm(tf.MistralConfig, "MistralForCausalLM", num_attention_heads=4, num_key_value_heads=2,
                   **COMMON),
    "gemma": _lm(tf.GemmaConfig, "GemmaForCausalLM", num_attention_heads=4, num_key_value_heads=2, head_dim=12,
                 **COMMON),
    "phi": _lm(tf.PhiConfig, "PhiForCausalLM", num_attention_heads=4, partial_rotary_factor=0.5, **COMMON),
    "gpt2": _lm(tf.GPT2Config, "GPT2LMHeadModel", vocab_size=VOCAB, n_embd=48, n_layer=2, n_head=4, n_inner=64,
                n_positions=64, bos_token_id=0, eos_token_id=0),
    "opt": _lm(tf.OPTConfig, "OPTForCausalLM", vocab_size=VOCAB, hidden_size=48, ffn_dim=64, num_hidden_layers=2,
               num_attention_heads=4, word_embed_proj_dim=48, max_position_embeddings=64),
    "bert": _lm(tf.BertConfig, "BertForMaskedLM", vocab_size=VOCAB, hidden_size=48, intermediate_size=64,
                num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=64),
}


class SmallCNN(torch.nn.Module):
    """conv-bn-relu, a residual block, global pooling, a classifier: not an LLM."""

    def __init__(self):
        super().__init__()
        c = 8
        self.stem = torch.nn.Sequential(torch.nn.Conv2d(3, c, 3, padding=1), torch.nn.BatchNorm2d(c), torch.nn.ReLU())
        self.block = torch.nn.Sequential(torch.nn.Conv2d(c, 12, 3, padding=1), torch.nn.BatchNorm2d(12),
                                         torch.nn.ReLU(), torch.nn.Conv2d(12, c, 3, padding=1),
                                         torch.nn.BatchNorm2d(c))
        self.head = torch.nn.Linear(c, 10)

    def forward(self, x):
        h = self.stem(x)
        h = torch.relu(h + self.block(h))
        return self.head(h.mean(dim=(2, 3)))


def small_cnn():
    torch.manual_seed(0)
    m = SmallCNN().eval()
    with torch.no_grad():  # non-trivial batch-norm statistics
        for mod in m.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.running_mean.uniform_(-0.5, 0.5)
                mod.running_var.uniform_(0.5, 1.5)
    return m


def ids(seed=0, batch=2, length=12):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (batch, length), generator=g)
