"""Sample quality: PSNR/SSIM against the uncached samples, class accuracy and FD of a sample set."""
from tcgraph.eval.classifier import DigitsClassifier, load_classifier
from tcgraph.eval.metrics import PSNR_CAP, frechet_distance, psnr, ssim
from tcgraph.eval.quality import compare_samples, digits_quality, fd_floor

__all__ = [
    "PSNR_CAP",
    "DigitsClassifier",
    "compare_samples",
    "digits_quality",
    "fd_floor",
    "frechet_distance",
    "load_classifier",
    "psnr",
    "ssim",
]
