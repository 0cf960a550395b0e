"""Gradient attacks with a fixed eps: FGSM, PGD, APGD."""
