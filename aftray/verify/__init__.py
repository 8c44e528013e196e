"""Verifier: labels (final answers by `aftray.tasks.answers`), dedup, process scores and ranks of sampled COTs."""
from aftray.tasks.answers import extract_answer, is_correct
from aftray.verify.group import verify_group
from aftray.verify.process import arith_process_score, mc_step_values
from aftray.verify.rank import rank_cots

__all__ = ["arith_process_score", "extract_answer", "is_correct", "mc_step_values", "rank_cots",
           "verify_group"]
