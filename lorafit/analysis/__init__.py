"""What the adapter learned: exact ΔW spectra, rank metrics, a rank advisor, reports and plots."""

from lorafit.analysis.spectrum import lora_factors, lowrank_svd, read_adapter, spectrum_metrics  # noqa: F401
