"""indis.export: ONNX export, onnxruntime and TensorRT backends for INDIS predictors and denoisers.

``models`` describes each exportable model (names, batch axis, profiles, sample inputs; a denoiser's sigma
is ``[B]``), ``onnx_export`` writes and verifies ONNX files, ``ort_backend`` / ``tensorrt_backend`` run them
(TensorRT: unverified on hardware), ``backends`` wraps them as indis denoisers / predictors with the fallback
chain TensorRT -> onnxruntime -> torch. The CLI is ``indis export``.
"""

from indis.export.backends import Choice, ExportedDenoiser, ExportedPredictor, load_denoiser, load_predictor
from indis.export.models import ExportSpec, TensorSpec, check_per_sample_sigma, denoiser_spec, predictor_spec
from indis.export.onnx_export import ExportResult, export_onnx, is_current, verify_export, verify_onnx

__all__ = ["Choice", "ExportResult", "ExportSpec", "ExportedDenoiser", "ExportedPredictor", "TensorSpec",
           "check_per_sample_sigma", "denoiser_spec", "export_onnx", "is_current", "load_denoiser",
           "load_predictor", "predictor_spec", "verify_export", "verify_onnx"]
