"""Training, one concern a module (``transformer.trainer`` re-exports the public names):

- ``step``: the batch losses, ``choose_loss_fn`` and ``train_step`` (one optimizer step);
- ``run``: ``Run``, everything the loop works with, and ``setup``, which builds it;
- ``loop``: ``train``, ``fit`` and the loop's steps between two optimizer steps;
- ``signals``: ``StopSignal``, stopping cleanly on SIGTERM/SIGINT (and submitit's timeout
  notice under SLURM);
- ``metrics``: ``Meter``, ``Progress``, MFU and the HParams name of a run;
- ``validation``: loss, perplexity and BLEU on the validation split, attention maps;
- ``state``: ``TrainState``, checkpoints, resume and the RNG streams;
- ``host``: freed-memory handling, CPU threads, seeds.
"""
