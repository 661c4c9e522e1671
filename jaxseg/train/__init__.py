"""Training: state, sharded steps, optimizers, checkpoints and the train/eval loops."""
from jaxseg.train.checkpoint import (CheckpointError, CheckpointMismatchError, Checkpointer,
                                     CheckpointWarning)
from jaxseg.train.optim import make_optimizer, make_schedule
from jaxseg.train.sharding import (make_mesh, prefetch_to_device, replicate, replicate_on_mesh,
                                   shard_batch)
from jaxseg.train.state import TrainState, create_train_state
from jaxseg.train.step import (eval_logits, make_eval_step, make_predict_step, make_train_step,
                               pmap_replicate, pmap_unreplicate, replicate_state,
                               unreplicate_state, validate_batch)
