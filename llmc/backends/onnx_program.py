"""What a rank's ONNX program is made of, for both its writer (onnx_export, at build time) and its runner
(onnx_runner): the model's file name, the dtypes it is built in, and the collectives between its segments."""

import numpy as np

from llmc.plugins import collectives

MODEL = "model.onnx"  # a rank's program without collectives; with them, one model a segment (segmentN.onnx)
DTYPES = {"float32": np.float32, "float16": np.float16}
# The collectives between segments, by the op name a rank's program records.
COLLECTIVES = {"llmc::all_reduce": collectives.all_reduce, "llmc::all_gather": collectives.all_gather}
