"""Whether the bridges read, as a run goes: the numbers a user sees, and the plateau warning.

Every ``trainer.log_every`` steps the training batch that step already computes is measured per
bridge (``comm_cli.compose.diagnostics.BridgeProbe``: forward hooks, attention recomputed from the
recorded inputs): the output-to-state norm ratio, the attention entropy and the gate. Other steps
install no hook and cost nothing. The numbers go to the tracker and the step log as
``bridge<i>/<name>`` and to the console as one short text.

A bridge starts at zero output, so a run can sit on a plateau where the bridges read nothing
(docs/training_dynamics.md). ``PlateauDetector`` says so once, in one console line, when past
``trainer.plateau_after`` of the steps every bridge's output is still below
``trainer.plateau_output_ratio`` of the anchor state, or the validation loss has not improved on
the anchor's own (bridges off) by ``trainer.plateau_min_gain``.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass

from comm_cli.compose import ComposedModel
from comm_cli.compose.diagnostics import BridgeProbe, summarise

logger = logging.getLogger(__name__)

DOCS = "docs/training_dynamics.md#what-to-try"
# Engines under which the bridge weights are whole on every rank (sharded ones are not measured).
MEASURED_ENGINES = ("single", "ddp")

# console label -> the reading's name
CONSOLE = (("out/state", "output_ratio"), ("entropy", "entropy"), ("gate", "gate"))


class BridgeWatch:
    """Measures the bridges on the steps that report (``probe``), and says what it measured."""

    def __init__(self, model, trainer_cfg, total_steps: int, engine: str):
        self.log_every, self.total_steps = trainer_cfg.log_every, total_steps
        self.model = model if isinstance(model, ComposedModel) else None
        self.enabled = self.model is not None and trainer_cfg.bridge_readings
        if self.enabled and (engine not in MEASURED_ENGINES or trainer_cfg.compile_bridges):
            why = "trainer.compile_bridges=true" if trainer_cfg.compile_bridges else f"the {engine} engine"
            logger.info("bridge readings are off under %s (its bridge weights are sharded or compiled)", why)
            self.enabled = False
        self._probe: BridgeProbe | None = None

    def reports(self, step: int) -> bool:
        return step % self.log_every == 0 or step == self.total_steps

    def probe(self, step: int):
        """Around optimizer step ``step``: records the bridges' last calls when that step reports."""
        self._probe = None
        if not self.enabled or not self.reports(step):
            return contextlib.nullcontext()
        self._probe = BridgeProbe(self.model)
        return self._probe

    def readings(self, attention_mask) -> list[dict | None] | None:
        """Per bridge, the numbers of the batch the probe saw (``attention_mask``: that batch's)."""
        if self._probe is None:
            return None
        readings = self._probe.readings(query_mask=attention_mask)
        self._probe = None
        return readings


def tracker_metrics(readings) -> dict[str, float]:
    """``bridge<i>/output_ratio``, ``bridge<i>/entropy``, ``bridge<i>/gate`` (what was measured)."""
    return summarise(readings or [])


def console_text(readings) -> str:
    """``bridges out/state 0.012 0.034 · entropy 0.91 0.88`` (one value per bridge; ``-`` for a
    bridge that did not run); empty without readings."""
    if not readings:
        return ""
    parts = []
    for label, name in CONSOLE:
        values = [None if r is None else r.get(name) for r in readings]
        if all(v is None for v in values):
            continue
        parts.append(f"{label} " + " ".join("-" if v is None else f"{v:.3g}" for v in values))
    return ("bridges " + " · ".join(parts)) if parts else ""


@dataclass
class PlateauDetector:
    """Watches the latest bridge readings and validation loss; ``check`` returns the one-line
    warning the first time, past ``after`` of the steps, either says the bridges are not reading."""

    total_steps: int
    after: float = 0.5
    output_ratio: float = 0.01
    min_gain: float = 0.01
    enabled: bool = True
    anchor_loss: float | None = None
    latest_ratio: float | None = None
    latest_val_loss: float | None = None
    message: str | None = None

    @classmethod
    def from_config(cls, trainer_cfg, total_steps: int) -> PlateauDetector:
        return cls(
            total_steps,
            after=trainer_cfg.plateau_after,
            output_ratio=trainer_cfg.plateau_output_ratio,
            min_gain=trainer_cfg.plateau_min_gain,
            enabled=trainer_cfg.plateau_check,
        )

    def observe(self, readings=None, val_loss: float | None = None) -> None:
        ratios = [r["output_ratio"] for r in readings or [] if r and r.get("output_ratio") is not None]
        if ratios:
            self.latest_ratio = max(ratios)
        if val_loss is not None:
            self.latest_val_loss = val_loss

    def check(self, step: int) -> str | None:
        if not self.enabled or self.message is not None or step < self.after * self.total_steps:
            return None
        signs = []
        if self.latest_ratio is not None and self.latest_ratio < self.output_ratio:
            signs.append(
                f"every bridge's output is below {self.output_ratio:g} of the anchor state it is added to "
                f"(largest {self.latest_ratio:.2g})"
            )
        if self.latest_val_loss is not None and self.anchor_loss is not None:
            gain = (self.anchor_loss - self.latest_val_loss) / max(abs(self.anchor_loss), 1e-12)
            if gain < self.min_gain:
                signs.append(
                    f"the validation loss {self.latest_val_loss:.4f} is within {self.min_gain:.0%} of the "
                    f"anchor's own {self.anchor_loss:.4f} (bridges off)"
                )
        if not signs:
            return None
        self.message = (
            f"plateau at step {step}/{self.total_steps}: {' and '.join(signs)}, so the bridges are not "
            "reading the augment yet; try a larger optimizer.lr (e.g. x3), bridge.norm=true, more "
            f"bridge.num_heads, or more steps (see {DOCS})"
        )
        return self.message
