"""Helpers shared by the benchmark scripts (they import the installed depgraph, recover and viz packages)."""
from __future__ import annotations

import json
import os
from pathlib import Path

_HERE = os.path.dirname(os.path.abspath(__file__))

RESULTS = Path(_HERE) / "results"


def pre_schedule_sampling():
    """The ``"self"`` sampler the recorded benchmark rows were measured with, before the temperature schedule became
    the default (bcbbeef): temperature 1 throughout, special tokens allowed. Scripts whose stored results used it keep
    it, so a re-run reproduces the table instead of silently measuring today's default."""
    from depgraph.calibration import SelfSampling

    return SelfSampling(temperature=1.0, start_temperature=1.0, warmup=0, ban_special=False)


class Results:
    """A JSON file of benchmark results, re-read on start so a partial run keeps its rows."""

    def __init__(self, path: Path):
        self.path = path
        self.data = json.loads(path.read_text()) if path.exists() else {}

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps(self.data, indent=1) + "\n")


def load_smollm2():
    """The bundled SmolLM2-135M-Instruct in eval mode with the KV cache off (tracing needs it off)."""
    from depgraph.models import load_model

    model, tok = load_model()
    model.config.use_cache = False
    return model.eval(), tok


def perplexities(model, tok, windows: int | None, sets=("wikitext2", "ptb"), digits: int = 2,
                 protocol: str = "bos", batch_size: int = 8) -> dict:
    """{set: perplexity} on windows of 128 tokens, the first ``windows`` windows (None: the whole set), with
    ``protocol`` (``"bos"``: the tokenizer's BOS first when it adds one; ``"llm-pruner"``: bare windows)."""
    from recover.evaluate import perplexity

    return {name: round(perplexity(model, tok, name, window=128, limit=windows, progress=False, protocol=protocol,
                                   batch_size=batch_size)["ppl"], digits)
            for name in sets}


def load_avg() -> list:
    """The 1, 5 and 15-minute load averages (the machine is shared: every wall-clock figure carries them)."""
    return [round(x, 2) for x in os.getloadavg()]


def peak_rss_reset() -> None:
    """Reset the kernel's high-water mark of this process's RSS (Linux: clear_refs 5)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def peak_rss_mb() -> float | None:
    """This process's peak RSS in MB since the last :func:`peak_rss_reset` (Linux VmHWM; None elsewhere)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024)
    except OSError:
        return None
    return None


def md_table(header: list, rows) -> list:
    """Markdown lines of a table: the header row, its rule, one line per row (each a list of cells)."""
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + \
        ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
