"""Weight quantizers that onnxruntime's ``matmul_nbits_quantizer`` does not offer in the form needed here.

* :mod:`.grid` -- per-block 4/8-bit grids (symmetric, or with integer uint4/uint8 zero points) chosen by
  an importance-weighted error search (llama.cpp's imatrix idea: the error of a weight counts as much as
  the mean square of the activation it multiplies), and packing into ``MatMulNBits`` tensors.
* :mod:`.gptq` -- GPTQ error compensation on a fixed ("static") grid from :mod:`.grid`.

Both read :class:`~smoledge.quantize.calibration.CalibrationStats` (per-linear activation Gram matrices
from the fp32 model on the shipped calibration text).  RTN, HQQ and k-quant stay onnxruntime's.
"""
