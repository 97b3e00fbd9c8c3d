"""Tiny random mixture-of-experts models, built offline: transformers' fused experts (3-D expert weights)
and a hand-written LM whose experts are separate modules."""
from __future__ import annotations

import torch
import transformers as tf
from torch import nn

VOCAB = 96
_COMMON = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
               num_experts_per_tok=2, tie_word_embeddings=False)

MOE_CONFIGS = {  # name: (config class, model class, experts, extra config fields)
    "mixtral": (tf.MixtralConfig, "MixtralForCausalLM", 8, dict(intermediate_size=32)),
    "qwen3_moe": (tf.Qwen3MoeConfig, "Qwen3MoeForCausalLM", 4, dict(moe_intermediate_size=32, intermediate_size=48,
                                                                    head_dim=16, norm_topk_prob=False)),
    "olmoe": (tf.OlmoeConfig, "OlmoeForCausalLM", 6, dict(intermediate_size=32, eos_token_id=0, pad_token_id=1)),
    "gpt_oss": (tf.GptOssConfig, "GptOssForCausalLM", 4, dict(intermediate_size=32, head_dim=16)),
}
_EXPERT_COUNT_FIELD = {"mixtral": "num_local_experts", "qwen3_moe": "num_experts", "olmoe": "num_experts",
                       "gpt_oss": "num_local_experts"}


def build_moe(name: str, experts_implementation: str | None = None):
    cfg_cls, model_cls, n_experts, extra = MOE_CONFIGS[name]
    torch.manual_seed(0)
    cfg = cfg_cls(**_COMMON, **extra, **{_EXPERT_COUNT_FIELD[name]: n_experts})
    cfg.use_cache = False
    model = getattr(tf, model_cls)(cfg).eval()
    with torch.no_grad():  # random routers far enough from uniform that the routing is decided
        for n, p in model.named_parameters():
            if n.endswith(("gate.weight", "router.weight", "router.bias")) or "experts" in n:
                p.normal_(0, 0.5 if "experts" not in n else 0.1)
    if experts_implementation:
        model.set_experts_implementation(experts_implementation)
    return model


class Expert(nn.Module):
    def __init__(self, hidden, inter):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inter, bias=False)
        self.up_proj = nn.Linear(hidden, inter, bias=False)
        self.down_proj = nn.Linear(inter, hidden, bias=False)

    def forward(self, x):
        return self.down_proj(nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))


class UnfusedMoE(nn.Module):
    """Softmax-top-k routing over experts that are separate modules (every expert runs on every token;
    the routing weight of a token for expert e is zero unless e is in its top-k)."""

    def __init__(self, hidden, inter, num_experts, top_k):
        super().__init__()
        self.gate = nn.Linear(hidden, num_experts, bias=False)
        self.experts = nn.ModuleList(Expert(hidden, inter) for _ in range(num_experts))
        self.num_experts, self.top_k = num_experts, top_k

    def forward(self, x):
        w, idx = torch.topk(torch.softmax(self.gate(x), dim=-1), self.top_k, dim=-1)
        w = w / w.sum(-1, keepdim=True)
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            out = out + (w * (idx == e)).sum(-1, keepdim=True) * expert(x)
        return out


class SigmoidMoE(nn.Module):
    """Fused experts ``[E, out, in]`` gathered per token, sigmoid routing scores; ``score_bias=True`` adds a
    per-expert bias to the scores *after* the sigmoid (DeepSeek-V3's score correction)."""

    def __init__(self, hidden, inter, num_experts, top_k, score_bias=False):
        super().__init__()
        self.gate = nn.Linear(hidden, num_experts, bias=False)
        self.up = nn.Parameter(torch.randn(num_experts, inter, hidden) * 0.2)
        self.down = nn.Parameter(torch.randn(num_experts, hidden, inter) * 0.2)
        self.score_bias = nn.Parameter(torch.randn(num_experts) * 0.1) if score_bias else None
        self.num_experts, self.top_k = num_experts, top_k

    def forward(self, x):
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        scores = torch.sigmoid(self.gate(x))
        if self.score_bias is not None:
            scores = scores + self.score_bias
        w, idx = torch.topk(scores, self.top_k, dim=-1)
        w = w / w.sum(-1, keepdim=True)
        ids = idx.reshape(-1)
        h = torch.bmm(self.up[ids], x.repeat_interleave(self.top_k, 0).unsqueeze(-1)).squeeze(-1)
        h = torch.bmm(self.down[ids], nn.functional.gelu(h).unsqueeze(-1)).squeeze(-1)
        out = (h * w.reshape(-1, 1)).view(-1, self.top_k, shape[-1]).sum(1)
        return out.reshape(shape)


class BiasedRouterMoE(SigmoidMoE):
    """SigmoidMoE with a per-expert bias in the router that only chooses the experts: ``"probabilities"``
    adds a ``[1, E]`` parameter to softmax probabilities (ERNIE-4.5's moe_statics); ``"logits"`` adds a
    persistent buffer to the logits (Kolibri's correction), ``"logits-volatile"`` a non-persistent one.
    The mixing weights are the unbiased scores at the chosen experts."""

    def __init__(self, hidden, inter, num_experts, top_k, where):
        super().__init__(hidden, inter, num_experts, top_k)
        self.where = where
        bias = torch.randn(num_experts) * 0.3
        if where == "probabilities":
            self.choice_bias = nn.Parameter(bias.unsqueeze(0))
        else:
            self.register_buffer("choice_bias", bias, persistent=where == "logits")

    def forward(self, x):
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        logits = self.gate(x)
        if self.where == "probabilities":
            scores = torch.softmax(logits, dim=-1)
            _, idx = torch.topk(scores + self.choice_bias.squeeze(0), self.top_k, dim=-1)
        else:
            scores = logits
            _, idx = torch.topk(logits + self.choice_bias, self.top_k, dim=-1)
        w = torch.softmax(scores.gather(1, idx), dim=-1)
        ids = idx.reshape(-1)
        h = torch.bmm(self.up[ids], x.repeat_interleave(self.top_k, 0).unsqueeze(-1)).squeeze(-1)
        h = torch.bmm(self.down[ids], nn.functional.gelu(h).unsqueeze(-1)).squeeze(-1)
        out = (h * w.reshape(-1, 1)).view(-1, self.top_k, shape[-1]).sum(1)
        return out.reshape(shape)


class DenseScatterMoE(nn.Module):
    """Llama-4-style routing: the top-k scores scattered into a ``full_like(logits, -inf)`` canvas, a sigmoid
    (unchosen experts weigh 0), every expert run on every token by ``bmm`` over fused ``[E, in, out]``
    weights and summed. ``canvas="logits"`` scatters into a copy of the logits instead (not a constant)."""

    def __init__(self, hidden, inter, num_experts, top_k, canvas="fill"):
        super().__init__()
        self.gate = nn.Linear(hidden, num_experts, bias=False)
        self.up = nn.Parameter(torch.randn(num_experts, hidden, inter) * 0.2)
        self.down = nn.Parameter(torch.randn(num_experts, inter, hidden) * 0.2)
        self.num_experts, self.top_k, self.canvas = num_experts, top_k, canvas

    def forward(self, x):
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        logits = self.gate(x)
        top, idx = torch.topk(logits, self.top_k, dim=1)
        canvas = torch.full_like(logits, float("-inf")) if self.canvas == "fill" else logits.clone()
        scores = torch.sigmoid(canvas.scatter_(1, idx, top))
        routed = x.repeat(scores.shape[1], 1) * scores.transpose(0, 1).reshape(-1, 1)
        h = torch.bmm(routed.view(self.up.shape[0], -1, shape[-1]), self.up)
        out = torch.bmm(nn.functional.silu(h), self.down)
        return out.view(scores.shape[1], -1, shape[-1]).sum(0).reshape(shape)


class ArgmaxGroupedMoE(nn.Module):
    """Tokens grouped by the argmax of a router (no top-k: not a routing site) and run through transformers'
    ``grouped_mm_fallback`` over fused ``[E, in, out]`` weights: the experts are not provably routed, the
    per-expert neurons are."""

    def __init__(self, hidden, inter, num_experts):
        super().__init__()
        import transformers.integrations.moe  # noqa: F401  (registers torch.ops.transformers.grouped_mm_fallback)

        self.gate = nn.Linear(hidden, num_experts, bias=False)
        self.up = nn.Parameter(torch.randn(num_experts, hidden, inter) * 0.2)
        self.down = nn.Parameter(torch.randn(num_experts, inter, hidden) * 0.2)
        self.num_experts = num_experts

    def forward(self, x):
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        expert = self.gate(x).argmax(-1)
        order = torch.argsort(expert)
        counts = torch.histc(expert.float(), bins=self.num_experts, min=0, max=self.num_experts - 1)
        offs = torch.cumsum(counts.int(), 0).int()
        mm = torch.ops.transformers.grouped_mm_fallback
        h = mm(nn.functional.gelu(mm(x[order], self.up, offs=offs)), self.down, offs=offs)
        return h[torch.argsort(order)].reshape(shape)


class SparseMixerMoE(SigmoidMoE):
    """PhiMoE-style routing without top-k: the first choice is the max logit, the second the max once the first is
    set to -inf (``scatter``), each weighted by a softmax over the logits masked to -inf far below the choice
    (thresholds computed under ``no_grad``). ``mean_gate=True`` also scales the output by the mean router
    probability over the experts, which depends on how many there are (not exact)."""

    def __init__(self, hidden, inter, num_experts, mean_gate=False):
        super().__init__(hidden, inter, num_experts, 2)
        self.mean_gate = mean_gate

    @staticmethod
    def _choose(scores, logits, eps=0.01):
        with torch.no_grad():
            top, choice = scores.max(dim=-1, keepdim=True)
            far = ((top - logits) / logits.abs().clamp(min=top)) > 2 * eps
        weight = torch.softmax(scores.masked_fill(far, float("-inf")), dim=-1).gather(-1, choice)
        return weight, choice

    def forward(self, x):
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        logits = self.gate(x)
        w1, e1 = self._choose(logits, logits)
        w2, e2 = self._choose(torch.scatter(logits, -1, e1, float("-inf")), logits)
        w, idx = torch.cat((w1, w2), dim=-1), torch.cat((e1, e2), dim=-1)
        ids = idx.reshape(-1)
        h = torch.bmm(self.up[ids], x.repeat_interleave(2, 0).unsqueeze(-1)).squeeze(-1)
        h = torch.bmm(self.down[ids], nn.functional.gelu(h).unsqueeze(-1)).squeeze(-1)
        out = (h * w.reshape(-1, 1)).view(-1, 2, shape[-1]).sum(1)
        if self.mean_gate:
            out = out * torch.softmax(logits, -1).mean(-1, keepdim=True)
        return out.reshape(shape)


class MoELM(nn.Module):
    def __init__(self, make_moe, hidden=64, layers=2):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, hidden)
        self.norms = nn.ModuleList(nn.LayerNorm(hidden) for _ in range(layers))
        self.moes = nn.ModuleList(make_moe() for _ in range(layers))
        self.head = nn.Linear(hidden, VOCAB, bias=False)

    def forward(self, ids):
        h = self.embed(ids)
        for norm, moe in zip(self.norms, self.moes):
            h = h + moe(norm(h))
        return self.head(h)


def sigmoid_lm(score_bias=False):
    torch.manual_seed(0)
    return MoELM(lambda: SigmoidMoE(64, 32, 4, 2, score_bias)).eval()


def biased_router_lm(where):
    torch.manual_seed(0)
    return MoELM(lambda: BiasedRouterMoE(64, 32, 4, 2, where)).eval()


def dense_scatter_lm(canvas="fill"):
    torch.manual_seed(0)
    return MoELM(lambda: DenseScatterMoE(64, 32, 4, 2, canvas)).eval()


def argmax_grouped_lm():
    torch.manual_seed(0)
    return MoELM(lambda: ArgmaxGroupedMoE(64, 32, 4)).eval()


def sparse_mixer_lm(mean_gate=False):
    torch.manual_seed(0)
    return MoELM(lambda: SparseMixerMoE(64, 32, 4, mean_gate)).eval()


def unfused_lm():
    torch.manual_seed(0)
    return MoELM(lambda: UnfusedMoE(64, 32, 4, 2)).eval()


def ids(seed=0, batch=2, length=12):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (batch, length), generator=g)
