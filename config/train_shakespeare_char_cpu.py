# The best model we found that 2 CPU cores train in 100 seconds (README, Results; the search behind it
# is in docs/experiments.md, "Which CPU recipe (100 s)"):
# nanoGPT's CPU-sized model (4 layers, context 64) made narrower (96 wide, 3 heads: a cheaper step, so
# more steps in the budget) and given twice the context (128, at the same tokens a step), with rotary
# position encodings, multi-token prediction, Muon for the matrices inside the blocks, a larger batch
# and learning rate, more weight decay, no dropout, and a short warmup + cosine schedule laid over a
# 100-second budget instead of an iteration count.
# One setting for every CPU: what differs by machine is chosen at start-up, by measurement:
# bfloat16 autocast and bf16 Newton-Schulz in Muon where bf16 matmuls are native, float32 elsewhere.

out_dir = 'out-shakespeare-char-cpu'
eval_interval = 500
eval_iters = 20
log_interval = 10

dataset = 'shakespeare_char'
batch_size = 16
block_size = 128  # than 64 (batch 32): lower val loss in timed runs on both kinds of CPU

n_layer = 4
n_head = 3
n_embd = 96  # than 128 (nanoGPT's): lower in 100 s in float32, level with native bf16
dropout = 0.0  # 100 seconds is a few passes over the data: too short to overfit much
pos_encoding = 'rope'  # clearly ahead of learned and sinusoidal with AdamW, level with learned under Muon
mtp_weight = 0.3  # also learn the token after next: lower val loss at fixed iteration counts, no slower

optimizer = 'muon'  # our Muon (muon.py); with --optimizer=adamw use --batch_size=12 --learning_rate=2e-3
learning_rate = 1e-2  # Muon takes a higher rate than AdamW; the best of those tried at this width
# (docs/experiments.md, "A narrower model for 100 seconds")
max_seconds = 100  # of training, evals excluded; try --max_seconds=25 for a quick look
max_iters = 1_000_000  # the time budget ends the run
lr_decay_iters = 2000  # with max_seconds, warmup_iters / lr_decay_iters is the warmup's share of the time
warmup_iters = 20  # 1% of the time: a longer warmup trained worse
min_lr = 1e-4
beta2 = 0.99
weight_decay = 0.3  # more than nanoGPT's 0.1: less and more both trained worse here

device = 'cpu'
compile = False  # measured: no gain on CPU (and 'auto' would say the same)
