"""aftray: Alignment Fine-Tuning (AFT) as an on-policy Ray loop."""
