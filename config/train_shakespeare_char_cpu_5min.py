# The 100-second CPU recipe (config/train_shakespeare_char_cpu.py) scaled up for 5 minutes of
# training on a laptop CPU: 6 layers of 192 (2.7M parameters), context 128; its other choices kept.
# For 10 minutes: --max_seconds=600 --out_dir=out-shakespeare-char-cpu-10min.
# Results so far: docs/experiments.md, "Longer CPU budgets".

out_dir = 'out-shakespeare-char-cpu-5min'
eval_interval = 500  # evals (20 batches a split) and the final pass: a few % of the wall time
eval_iters = 20
log_interval = 10
always_save_checkpoint = False  # keep the checkpoint with the best val loss

dataset = 'shakespeare_char'
batch_size = 16
block_size = 128  # twice the 100-second recipe's context

n_layer = 6
n_head = 6
n_embd = 192
dropout = 0.0  # a few passes over the data: too few to overfit much
pos_encoding = 'rope'

optimizer = 'muon'
learning_rate = 7e-3
max_seconds = 300  # of training, evals excluded
max_iters = 1_000_000  # the time budget ends the run
lr_decay_iters = 2000  # with max_seconds, warmup_iters / lr_decay_iters is the warmup's share of the time
warmup_iters = 20
min_lr = 1e-4
beta2 = 0.99
weight_decay = 0.3

device = 'cpu'
compile = False
