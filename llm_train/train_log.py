"""A training run's log: train.log (appended, one timestamped line per message), TensorBoard scalars and the console
(above a tqdm bar), written by rank 0 only; on other ranks every call does nothing."""
import time

from llm_train.errors import UserError


def check_log_file(log_file):
    """Before any long work: a --log-file that is a directory is one UserError (opening it would fail later)."""
    if log_file.is_dir():
        raise UserError(f"--log-file {log_file} is a directory: pass the path of a file (e.g. "
                        f"{log_file / 'train.log'})")


class TrainLog:
    def __init__(self, log_file, tensorboard_dir, master):
        self.file = self.writer = None
        if master:
            from torch.utils.tensorboard import SummaryWriter

            log_file.parent.mkdir(parents=True, exist_ok=True)
            self.file = open(log_file, "a", encoding="utf-8")
            self.writer = SummaryWriter(str(tensorboard_dir))

    def __call__(self, msg):
        if self.file:
            from tqdm import tqdm

            tqdm.write(msg)
            self.file.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {msg}\n")
            self.file.flush()

    def scalars(self, prefix, entry, step):
        """entry's values (but "step" and None) as prefix/name scalars at step; a "val_" prefix of a name dropped."""
        if self.writer:
            for k, v in entry.items():
                if k != "step" and v is not None:
                    self.writer.add_scalar(f"{prefix}/{k.removeprefix('val_')}", v, step)

    def close(self):
        if self.file:
            self.writer.close()
            self.file.close()
