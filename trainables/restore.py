"""Before ``Tuner.restore``: point every unfinished trial at a checkpoint that exists.

Tune saves its experiment state (``experiment_state-*.json``: each trial, with its
checkpoint manager) now and then, while each trial keeps checkpointing and
``CheckpointConfig(num_to_keep)`` deletes the older ones. A driver killed between two
saves leaves a state that may name a checkpoint deleted since; Tune then fails the trial
with "Could not recover from checkpoint as it does not exist on storage anymore"
(ray-project/ray #27790; Ray 1.x fell back to the newest checkpoint, #29099). The same
happens when checkpoints are lost for any other reason.

`repair_checkpoints` fixes the state on storage before Tune reads it: for every
unfinished trial (not TERMINATED, not ERROR) whose named checkpoint is gone, it names the
newest ``checkpoint_NNNNNN`` folder of that trial whose report the driver had processed,
or no checkpoint at all, so that the trial starts again from step 0. Which folders those
are: a function trainable waits in each report until the driver asks for the next result
(Tune's default result buffer of 1), so every folder below the trial's newest one was
reported and processed (its trace points are in the driver's journal), while the newest
folder may be one the killed driver never saw (its points lost with it, and the folder
perhaps half uploaded): it counts only if the saved state itself holds it. Restoring from
a checkpoint past the journal's last step would lose the steps between. The repair also
moves the trial's next checkpoint index past every folder on storage, so that a new
checkpoint never overwrites one the repaired state holds. A trial whose named checkpoint
exists is left to Tune as it is. The trace stays exact either way: the trial replays the
steps after its checkpoint and the driver's writer drops the steps it already holds.

Why repair the saved state, rather than catch the failed restore: the state is the one
thing Tune reads on restore, so fixing it keeps Tune's own restore, retry and pruning
logic in charge, for local folders and URIs alike (through pyarrow's filesystems, as
Ray does). The state is edited field by field with Ray's own classes: the JSON of a
trial stays as Tune wrote it except the two values that change (its checkpoint manager,
rebuilt through ``_CheckpointManager.register_checkpoint``, and its storage's
``current_checkpoint_index``), decoded and encoded with Tune's ``TuneFunctionDecoder`` /
``TuneFunctionEncoder``. The manager and the training result are Ray internals (Ray
2.x's ``ray.train._internal``); if their shape ever changes, the state is left as it is
and a warning says why (the restore then behaves as plain Tune).

Imports ray and pyarrow; nothing else of the project but `trainables.storage`.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from typing import Any

import pyarrow.fs as pafs

from trainables.storage import open_filesystem

log = logging.getLogger(__name__)

CHECKPOINT_DIR = re.compile(r"^checkpoint_(\d+)$")  # Ray's checkpoint folder names (StorageContext)
STATE_FILE = re.compile(r"^experiment_state-.*\.json$")  # TuneController.CKPT_FILE_TMPL
SETTLED = ("TERMINATED", "ERROR")  # a resume does not run these trials again (resume_errored=False)


@dataclass(frozen=True)
class Repair:
    """One trial whose saved state named a checkpoint that is gone.

    Attributes:
        trial: the trial's folder name.
        named: the checkpoint folder the state named (gone).
        restored: the checkpoint folder it restores from now; None: it starts again from step 0.
    """

    trial: str
    named: str
    restored: str | None

    def describe(self) -> str:
        now = f"restores from {self.restored}" if self.restored else "starts again from step 0 (no checkpoint left)"
        return f"trial {self.trial}: its checkpoint {self.named} is gone from storage; it {now}"


def repair_checkpoints(tune_dir: str) -> list[Repair]:
    """Make the newest experiment state in ``tune_dir`` name only checkpoints that exist.

    Args:
        tune_dir: a Tune experiment folder, local or a URI (what ``Tuner.restore`` is given).
    Returns:
        The trials repaired (the state file is rewritten only if there is one).
    """
    fs, root = open_filesystem(tune_dir)
    root = root.rstrip("/")
    names = [f.base_name for f in fs.get_file_info(pafs.FileSelector(root, allow_not_found=True))
             if f.type == pafs.FileType.File and STATE_FILE.match(f.base_name)]
    if not names:
        return []
    path = f"{root}/{max(names)}"  # the one Tune restores from (_find_newest_experiment_checkpoint)
    with fs.open_input_stream(path) as fh:
        state = json.loads(fh.readall())
    try:
        repairs = [r for entry in state["trial_data"] if (r := _repair_trial(fs, root, entry))]
    except (AttributeError, ImportError, KeyError, TypeError, ValueError) as e:
        log.warning("could not check the checkpoints that %s names (%s: %s); restoring it as Tune saved it",
                    path, type(e).__name__, e)
        return []
    if repairs:
        tmp = f"{path}.repair"
        with fs.open_output_stream(tmp) as fh:
            fh.write(json.dumps(state).encode())
        fs.move(tmp, path)  # a rename on a local disk, a whole object on a URI storage
    return repairs


def _repair_trial(fs: pafs.FileSystem, root: str, entry: list[str]) -> Repair | None:
    """Repair one ``[trial JSON, runtime metadata JSON]`` pair of the state in place."""
    from ray.train._internal.checkpoint_manager import _CheckpointManager
    from ray.train._internal.session import _TrainingResult
    from ray.tune import Checkpoint

    trial, meta = json.loads(entry[0]), json.loads(entry[1])
    if trial["status"] in SETTLED:
        return None
    manager = _decode(meta["checkpoint_manager"])
    named = manager.latest_checkpoint_result if manager is not None else None
    if named is None:  # never checkpointed: Tune starts it from step 0 anyway
        return None
    storage = _decode(trial["storage"])
    trial_dir = f"{root}/{storage.trial_dir_name}"
    named_path = named.checkpoint.path.replace(storage.trial_fs_path, trial_dir, 1)  # as Trial.set_storage maps it
    if fs.get_file_info(named_path).type == pafs.FileType.Directory:
        return None
    folders = _checkpoint_folders(fs, trial_dir)
    known = {r.checkpoint.path.rsplit("/", 1)[-1]: r.metrics for r in manager.best_checkpoint_results}
    restored = _newest_processed(fs, trial_dir, folders, set(known))
    rebuilt = _CheckpointManager(checkpoint_config=manager.checkpoint_config)
    if restored is not None:
        # a checkpoint newer than the state: Tune's counters (training_iteration, ...) resume from
        # the named one's; the trial's own step comes from the checkpoint
        rebuilt.register_checkpoint(_TrainingResult(
            checkpoint=Checkpoint(path=f"{trial_dir}/{restored}", filesystem=named.checkpoint.filesystem),
            metrics=known.get(restored, named.metrics)))
    meta["checkpoint_manager"] = _encode(rebuilt)
    if folders:
        storage.current_checkpoint_index = max(storage.current_checkpoint_index, max(folders.values()) + 1)
        trial["storage"] = _encode(storage)
    entry[0], entry[1] = json.dumps(trial, indent=2), json.dumps(meta, indent=2)
    return Repair(trial=str(storage.trial_dir_name), named=named_path.rsplit("/", 1)[-1], restored=restored)


def _checkpoint_folders(fs: pafs.FileSystem, trial_dir: str) -> dict[str, int]:
    """The trial's checkpoint folders on storage: name -> index."""
    found = fs.get_file_info(pafs.FileSelector(trial_dir, allow_not_found=True))
    return {f.base_name: int(m.group(1)) for f in found
            if f.type == pafs.FileType.Directory and (m := CHECKPOINT_DIR.match(f.base_name))}


def _newest_processed(fs: pafs.FileSystem, trial_dir: str, folders: dict[str, int], known: set[str]) -> str | None:
    """The newest checkpoint folder that holds files and whose report the driver processed:
    any but the trial's newest folder, which counts only if the saved state holds it
    (see the module docstring); None if there is none."""
    ordered = sorted(folders, key=folders.get, reverse=True)
    for name in ordered[1:] if ordered and ordered[0] not in known else ordered:
        files = fs.get_file_info(pafs.FileSelector(f"{trial_dir}/{name}", recursive=True))
        if any(f.type == pafs.FileType.File for f in files):
            return name
    return None


def _decode(value: Any) -> Any:
    """One value of Tune's JSON, as ``TuneFunctionEncoder`` wrote it (a cloudpickled object
    of Tune's own state, read from the experiment's own storage)."""
    from ray.tune.utils.serialization import TuneFunctionDecoder

    return TuneFunctionDecoder(allow_cloudpickle=True).decode(json.dumps(value))


def _encode(value: Any) -> Any:
    """``value`` as ``TuneFunctionEncoder`` writes it into Tune's JSON."""
    from ray.tune.utils.serialization import TuneFunctionEncoder

    return json.loads(json.dumps(value, cls=TuneFunctionEncoder))
