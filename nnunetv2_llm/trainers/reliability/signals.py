"""SIGTERM (cluster time limits, ``kill``) ends training with a one-line message saying which epoch ``--c``
continues from, instead of dying mid-write. SIGKILL cannot be caught; atomic checkpoint writes cover it."""

from __future__ import annotations

import contextlib
import os
import signal
import threading

from nnunetv2_llm.trainers.reliability.exits import ExitMixin


class SignalMixin(ExitMixin):
    """Installs the SIGTERM handler for the training loop (main thread only) and restores the previous one after."""

    _previous_sigterm = None

    def on_train_start(self) -> None:
        self._install_sigterm_handler()
        super().on_train_start()

    def on_train_end(self) -> None:
        try:
            super().on_train_end()
        finally:
            self._restore_sigterm_handler()

    def _install_sigterm_handler(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return

        trainer_pid = os.getpid()

        def on_sigterm(signum, frame):
            if os.getpid() != trainer_pid:
                # A forked data-augmentation worker (it inherited this handler). A whole process group gets
                # SIGTERM at once (scancel, kill -- -PGID): dying at once would make batchgenerators' results
                # thread in the trainer raise "background workers are no longer alive" with a traceback before
                # the trainer's own handler runs. So keep working for a grace period: the trainer stops the
                # workers cleanly; if it does not (it was not signalled), die anyway.
                signal.signal(signum, signal.SIG_DFL)
                timer = threading.Timer(5.0, os.kill, (os.getpid(), signal.SIGKILL))
                timer.daemon = True  # a non-daemon timer would hold up every normal exit of the worker by 5 s
                timer.start()
                return
            self._restore_sigterm_handler()
            self._stop_data_loaders()
            self._exit_with(f"interrupted by {signal.Signals(signum).name} during epoch {self.current_epoch}; "
                            f"{self._resume_hint()}", 128 + signum)

        with contextlib.suppress(ValueError, OSError):
            self._previous_sigterm = signal.signal(signal.SIGTERM, on_sigterm)

    def _stop_data_loaders(self) -> None:
        """Stop nnU-Net's augmentation workers before exiting, quietly (their results thread would otherwise
        report the dying workers with a traceback)."""
        previous_hook = threading.excepthook

        def quiet(args):
            if not (isinstance(args.exc_value, RuntimeError) and "workers are no longer alive" in str(args.exc_value)):
                previous_hook(args)

        threading.excepthook = quiet
        for loader in (self.dataloader_train, self.dataloader_val):
            finish = getattr(loader, "_finish", None)
            if finish is not None:
                with contextlib.suppress(Exception), open(os.devnull, "w") as devnull, \
                        contextlib.redirect_stdout(devnull):
                    finish()

    def _restore_sigterm_handler(self) -> None:
        if self._previous_sigterm is not None and threading.current_thread() is threading.main_thread():
            with contextlib.suppress(ValueError, OSError):
                signal.signal(signal.SIGTERM, self._previous_sigterm)
            self._previous_sigterm = None
