"""Distillation: ODE-trajectory initialisation and asymmetric DMD (builds on causvid)."""
