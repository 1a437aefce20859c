"""Experiments reproducing the papers' claims with jaxcompress; never imported by the library.

Importing this package quiets TensorFlow (imported by tensorflow-datasets when it reads the
data) before it loads: no C++ start-up lines, Python absl logs only from ERROR up. A value the user
already set in the environment wins.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# TensorFlow logs its oneDNN notice before absl logging is initialised, past the level above;
# oneDNN only changes TensorFlow's own kernels, which the data pipeline does not use.
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

try:
    from absl import logging as _absl_logging
except ImportError:  # absl comes with TensorFlow; without it there is nothing to quiet
    pass
else:
    _absl_logging.set_verbosity(_absl_logging.ERROR)
