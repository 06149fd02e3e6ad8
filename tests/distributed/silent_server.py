"""A fork server that never answers: imported only by the loader workers' fork server, among its
preloaded modules (fault_worker.py `stall-start` adds it to disttrain.data.workers.PRELOAD), it holds
the server still before its first answer, as an import that hangs would. The server ends with the
training process that started it (Linux's parent-death signal), so nothing outlives the test."""

import ctypes
import os
import signal
import threading

PR_SET_PDEATHSIG = 1

ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
if os.getppid() != int(os.environ["SILENT_SERVER_PARENT"]):  # the training process was gone before prctl
    os._exit(1)
threading.Event().wait()
