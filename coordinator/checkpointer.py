"""Checkpointing the shared model: download the swarm's state, write it atomically.

Periodic checkpoints run in a background thread so the coordinator keeps tracking meanwhile; at most
one runs at a time. A failed download or an unwritable directory is logged and the previous
checkpoint stays in place; the next attempt happens at the next checkpoint step.

Every written checkpoint is then evaluated on the run's held-out set (fixed masks, see
:mod:`dedloc.task.evaluation`), in the same background thread: an honest loss beside the training
loss peers report about themselves. Results go to ``on_heldout(step, loss)``.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Optional

import hivemind

from transformers import AutoModelForMaskedLM

from dedloc.checkpoint import CheckpointInfo, load_checkpoint, load_optimizer_state, write_checkpoint
from dedloc.errors import UserInputError
from dedloc.config import RunConfig
from dedloc.swarm.optimizer import StateReader
from dedloc.swarm.records import RunManifest
from dedloc.task.build import hf_tokenizer
from dedloc.task.evaluation import HeldoutSet, evaluate, heldout_set
from dedloc.task.model import build_model, parameter_sketch

logger = logging.getLogger(__name__)


@dataclass
class SavedCheckpoint:
    step: int
    path: Path
    saved_at: float


class Checkpointer:
    def __init__(
        self,
        dht: hivemind.DHT,
        manifest: RunManifest,
        root: Path,
        on_heldout: Optional[Callable[[int, float], None]] = None,
        cache_dir: Optional[Path] = None,
    ):
        config: RunConfig = manifest.config
        self.config, self.manifest, self.root = config, manifest, root
        self.on_heldout, self.cache_dir = on_heldout, cache_dir
        self._heldout: Optional[HeldoutSet] = None
        self._heldout_failed = False
        self.tokenizer = hf_tokenizer(config, manifest.tokenizer_json)
        self.model = build_model(config.model, self.tokenizer, seed=config.training.seed)
        self.reader = StateReader(dht, config, manifest.swarm_prefix, self.model)
        self.latest: Optional[SavedCheckpoint] = None
        self._lock = threading.Lock()
        self._thread: Optional[threading.Thread] = None

    @property
    def busy(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def resume(self, info: CheckpointInfo) -> None:
        """Hold a verified checkpoint as the current state, and serve it to peers that join.

        Raises :class:`UserInputError` when the checkpoint belongs to another model or tokenizer."""
        tokenizer_hash = info.trainer_state.get("tokenizer_sha256")
        if tokenizer_hash != self.manifest.tokenizer_sha256:
            raise UserInputError(
                f"checkpoint {info.path} was trained with another tokenizer ({str(tokenizer_hash)[:12]}, the run "
                f"now has {self.manifest.tokenizer_sha256[:12]}); move it away to start from scratch"
            )
        try:
            weights = AutoModelForMaskedLM.from_pretrained(info.path).state_dict()
            self.reader.load(weights, load_optimizer_state(info.path, info), info.step)
        except (RuntimeError, ValueError, KeyError, OSError) as e:
            raise UserInputError(
                f"checkpoint {info.path} does not fit the run's model: {str(e).splitlines()[0]}; "
                "move it away to start from scratch"
            ) from None
        self.reader.share()
        self.latest = SavedCheckpoint(step=info.step, path=info.path, saved_at=info.trainer_state.get("saved_at", 0.0))

    def offer_as_final(self) -> tuple[float, ...]:
        """Serve the state held now — the final checkpoint's — ahead of every peer's own, and return
        its :func:`parameter_sketch`: a peer whose parameters ended apart from it downloads it."""
        with self._lock:
            self.reader.share(final=True)
            return parameter_sketch(self.model)

    def start(self, wanted_step: int, stop: Optional[threading.Event] = None) -> bool:
        """Begin a checkpoint of a state at least as new as ``wanted_step`` in the background;
        False if one is already running."""
        if self.busy:
            return False
        self._thread = threading.Thread(
            target=self.save, args=(wanted_step,), kwargs=dict(stop=stop), name="checkpointer", daemon=True
        )
        self._thread.start()
        return True

    def wait(self, timeout: Optional[float] = None) -> None:
        if self._thread is not None:
            self._thread.join(timeout)

    def save(self, wanted_step: int, attempts: int = 3, stop: Optional[threading.Event] = None) -> Optional[SavedCheckpoint]:
        """Download a state of step ≥ ``wanted_step`` (trying up to ``attempts`` times) and write it.

        Returns what was written, or None (logged) when no peer served such a state or writing failed.
        """
        with self._lock:
            step = None
            for attempt in range(attempts):
                started = time.monotonic()
                try:
                    step = self.reader.download(timeout=self.config.averaging.load_state_timeout)
                except Exception as e:  # hivemind raises TimeoutError and connection errors here
                    logger.warning(f"downloading the swarm's state failed: {e!r}")
                    step = None
                if step is not None and step >= wanted_step:
                    logger.info(f"downloaded the swarm's state at step {step} in {time.monotonic() - started:.1f} s")
                    break
                logger.info(f"no peer served a state of step ≥ {wanted_step} yet (attempt {attempt + 1}/{attempts})")
                if (stop or threading.Event()).wait(2.0):
                    return None
            else:
                logger.warning(f"could not download the swarm's state for step {wanted_step}; keeping the previous checkpoint")
                return None
            try:
                path = write_checkpoint(
                    self.root,
                    step,
                    self.model,
                    self.tokenizer,
                    self.reader.optimizer,
                    trainer_state=dict(
                        run_id=self.config.run_id,
                        config_sha256=self.manifest.config_sha256,
                        tokenizer_sha256=self.manifest.tokenizer_sha256,
                        run_config=self.config.to_json_dict(),
                    ),
                    keep_last=self.config.checkpoint.keep_last,
                )
            except Exception as e:
                logger.error(
                    f"cannot write a checkpoint to {self.root}: {getattr(e, 'strerror', None) or e}; the previous checkpoint is "
                    "kept and tracking goes on"
                )
                return None
            self.latest = SavedCheckpoint(step=step, path=path, saved_at=time.time())
            self.reader.share()
            logger.info(f"checkpoint step={step} written to {path}")
            self._evaluate(step, self.model)
            return self.latest

    def heldout(self) -> Optional[HeldoutSet]:
        """The held-out set, built on first use (None when disabled or the split is empty)."""
        wanted = self.config.checkpoint.heldout_sequences
        if self._heldout is None and wanted > 0 and not self._heldout_failed:
            try:
                self._heldout = heldout_set(self.config, self.tokenizer, max_sequences=wanted, cache_dir=self.cache_dir)
            except Exception as e:
                self._heldout_failed = True
                logger.warning(f"no held-out evaluation for this run: {e}")
        return self._heldout

    def _evaluate(self, step: int, model) -> Optional[float]:
        heldout = self.heldout()
        if heldout is None:
            return None
        started = time.monotonic()
        try:
            loss = evaluate(model, heldout)
        except Exception as e:  # an evaluation problem must never cost a checkpoint or the coordinator
            logger.warning(f"held-out evaluation of step {step} failed: {e!r}")
            return None
        logger.info(
            f"held-out loss at step {step}: {loss:.4f} ({heldout.sequences} sequences, {time.monotonic() - started:.1f} s)"
        )
        if self.on_heldout is not None:
            self.on_heldout(step, loss)
        return loss

    def evaluate_saved(self, paths: Iterable[Path], skip_steps: set[int], stop: Optional[threading.Event] = None) -> None:
        """Evaluate checkpoints already on disk whose step is not in ``skip_steps`` (e.g. after the
        history was lost), in the background; a checkpoint that does not verify is skipped."""
        pending = list(paths)
        if not pending or self.config.checkpoint.heldout_sequences == 0:
            return

        def run() -> None:
            with self._lock:
                for path in pending:
                    if stop is not None and stop.is_set():
                        return
                    try:
                        info = load_checkpoint(path)
                        if info.step in skip_steps:
                            continue
                        model = AutoModelForMaskedLM.from_pretrained(info.path)
                    except Exception as e:
                        logger.warning(f"cannot load checkpoint {path} for held-out evaluation: {e}")
                        continue
                    self._evaluate(info.step, model)

        threading.Thread(target=run, name="heldout-backfill", daemon=True).start()

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop the reader; a checkpoint still being written is given ``timeout`` seconds to finish
        (an interrupted one leaves only a temporary directory, never a partial checkpoint)."""
        self.wait(timeout=timeout)
        self.reader.shutdown()
