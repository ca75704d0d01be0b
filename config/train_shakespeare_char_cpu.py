# The best model we found that 2 CPU cores train in 100 seconds (README, "The CPU recipe"):
# nanoGPT's CPU-sized model (4 layers, 4 heads, 128 wide, context 64) with rotary position
# encodings, Muon for the matrices inside the blocks, a larger batch and learning rate, more weight
# decay, no dropout, and a short warmup + cosine schedule laid over a 100-second budget instead of an
# iteration count.
# One setting for every CPU: what differs by machine is chosen at start-up, by measurement:
# bfloat16 autocast and bf16 Newton-Schulz in Muon where bf16 matmuls are native, float32 elsewhere.

out_dir = 'out-shakespeare-char-cpu'
eval_interval = 500
eval_iters = 20
log_interval = 10

dataset = 'shakespeare_char'
batch_size = 32
block_size = 64

n_layer = 4
n_head = 4
n_embd = 128
dropout = 0.0  # 100 seconds is under 4 passes over the data: too short to overfit much
pos_encoding = 'rope'  # AdamW: 1.588 vs 1.618 learned, 1.676 sinusoidal; Muon: 1.543 vs 1.552, 1.579

optimizer = 'muon'  # our Muon (model.py); with --optimizer=adamw use --batch_size=12 --learning_rate=2e-3
learning_rate = 7e-3  # searched on both kinds of CPU: 3e-3, 5e-3, 7e-3, 1e-2 (README)
max_seconds = 100  # of training, evals excluded; try --max_seconds=25 for a quick look
max_iters = 1_000_000  # the time budget ends the run
lr_decay_iters = 2000  # with max_seconds, warmup_iters / lr_decay_iters is the warmup's share of the time
warmup_iters = 20  # 1% of the time: at 1,000 iterations 1% beat 2.5% on seeds 1337 and 1, tied on 2
min_lr = 1e-4
beta2 = 0.99
weight_decay = 0.3  # at 1,000 iterations 0.3 beat 0.1 on seeds 1337 and 1; 0.6 did not

device = 'cpu'
compile = False  # measured: no gain on CPU (and 'auto' would say the same)
