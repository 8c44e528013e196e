"""The table of losses: each `loss.name` once, with the per-group term it runs and what it reads.

Everything that lists losses derives from `LOSS_TABLE`: what `loss.name` may be (config validation: this
module imports nothing, so that stays torch-free), `aftray.train.losses.OBJECTIVES` (each row's method through
`losses.METHODS`), the sequences collate reads and those dynamic sampling may leave out
(`LossRow.sequences_needed`, `LossRow.needs_pairs`), the comparison's arms (`aftray.experiments.compare.ARMS`)
and README's list of losses (tests/test_losses.py checks it). To add a loss: write its per-group formula and
batched twin in aftray/train/losses.py (one `METHODS` entry maps a method name to the two) and add one row here.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LossRow:
    name: str  # `loss.name`
    method: str | None  # its per-group term: a key of aftray.train.losses.METHODS; None: L_VFT alone
    about: str  # one line, README's list of losses
    constraint: str | None = None  # "bc" or "dc" (docs/method.md §AFT — constrained alignment); None: none
    vft_on_positives: bool = False  # the positive samples join L_VFT's targets (RFT)
    pairwise: bool = False  # the method reads a group's samples only through its (positive, negative) pairs
    arm: str = ""  # its arm's label in the loss comparison (default: the name)
    paper: bool = False  # an arm of the paper's comparison (jobs/compare_losses.py's default arms)

    @property
    def arm_label(self) -> str:
        return self.arm or self.name

    def needs_pairs(self, cfg) -> bool:
        """Whether, under `cfg` (the run's LossConfig), a group whose COTs are all right or all wrong adds
        only its reference COT (L_VFT) to the loss: its samples can then be left out of training without
        changing the loss (rows.mixed_or_reference). Not with `loss.vft_weight=0`: such a group would then be
        left with no sequence at all (a micro-batch of those has nothing to forward), so it trains whole."""
        return self.pairwise and not cfg.vft_on_positives and cfg.vft_weight > 0

    def sequences_needed(self, cfg) -> tuple[bool, bool]:
        """(reference COT, sampled COTs): the sequences this loss reads under `cfg` (the run's LossConfig);
        collate skips the rest. With `loss.vft_weight=0` nothing reads the reference."""
        return cfg.vft_weight > 0, self.method is not None or self.vft_on_positives or cfg.vft_on_positives


LOSS_TABLE = (
    LossRow("vft", None, "L_VFT alone, imitation of the reference COTs", arm="vft_continued", paper=True),
    LossRow("rft", None, "RFT: L_VFT on the reference COTs and the positive samples", vft_on_positives=True,
            paper=True),
    LossRow("aft_dc", "aft", "AFT, detached constraint (L_DC)", "dc", pairwise=True, paper=True),
    LossRow("aft_bc", "aft", "AFT, boundary constraint (L_BC; the default)", "bc", pairwise=True, paper=True),
    LossRow("aft_rank_dc", "aft_rank", "AFT with ranking feedback (ours), detached constraint", "dc"),
    LossRow("aft_rank_bc", "aft_rank", "AFT with ranking feedback (ours), boundary constraint", "bc", paper=True),
    LossRow("dpo", "dpo", "DPO, the sampling policy as reference", pairwise=True, paper=True),
    LossRow("dpo_bc", "dpo", "DPO + the BC term (ours)", "bc", pairwise=True, paper=True),
    LossRow("rrhf", "rrhf", "RRHF: a hinge over ranked pairs + VFT on the best", paper=True),
    LossRow("rrhf_bc", "rrhf", "RRHF + the BC term (ours)", "bc", paper=True),
    LossRow("pro", "pro", "PRO: listwise (Plackett-Luce) + VFT on the best"),
    LossRow("pro_bc", "pro", "PRO + the BC term (ours)", "bc"),
    LossRow("orpo", "orpo", "ORPO: odds ratio, no reference model", pairwise=True),
    LossRow("orpo_bc", "orpo", "ORPO + the BC term (ours)", "bc", pairwise=True),
    LossRow("align_none", "aft", "AFT's L_A without a constraint, kept to reproduce its degradation",
            pairwise=True, paper=True),
)
LOSS_ROWS = {row.name: row for row in LOSS_TABLE}
