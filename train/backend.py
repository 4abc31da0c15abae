"""Keras, imported once and quietly: every part of curate that trains or predicts gets it from here.

TensorFlow's native code writes to stderr while it loads, before its logging is set up, so
TF_CPP_MIN_LOG_LEVEL cannot hold those lines back ("All log messages before absl::InitializeLog() is
called are written to STDERR", then oneDNN and CUDA notices). On a machine without a GPU it also logs
"failed call to cuInit: ... CUDA error" as an error, which says nothing but that there is no GPU. curate
promises stderr for its own messages (`-q` leaves it empty on success), so the import runs with the
process's stderr pointed at /dev/null, and TF_CPP_MIN_LOG_LEVEL defaults to 3. A failed import still
raises as usual, after stderr is back. The device a model trained on is in its metrics.json.

Keras also warns when several freshly built models trigger "tf.function retracing": `curate flag` builds
one model per fold on purpose, so that warning is dropped too.
"""

from __future__ import annotations

import logging
import os
import sys

from curate.io import native_stderr_silenced


class _WithoutRetracingNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "triggered tf.function retracing" not in record.getMessage()


def _import_keras():
    if "keras" not in sys.modules:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
        with native_stderr_silenced():
            import keras  # noqa: F401
    logging.getLogger("tensorflow").addFilter(_WithoutRetracingNotice())
    return sys.modules["keras"]


keras = _import_keras()
