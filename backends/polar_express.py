"""
Polar Express coefficients (a, b, c), one triple per Newton-Schulz iteration (from the original; Amsel et al.,
"The Polar Express", arXiv:2505.16932): framework-neutral, shared by muon_torch.py and muon_mlx.py.
"""

POLAR_EXPRESS_COEFFS = [
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
]
