# The best model a CPU trains in 100 seconds, or with --max_seconds=S in S seconds (README, Results):
#   python train.py config/train_shakespeare_char_cpu.py                     # 100 seconds
#   python train.py config/train_shakespeare_char_cpu.py --max_seconds=600   # 10 minutes
# The model's shape, context, learning rate and dropout are chosen at start-up for this machine and
# this budget: a few seconds of measured steps and a fit of loss to size, tokens and context
# (sizing.py; the runs behind the fit are in docs/experiments.md, "The budget-to-shape rule"). --n_layer, --n_embd,
# --n_head, --learning_rate, --dropout, --block_size or --batch_size given here or on the command
# line are kept, and the rule chooses the rest: dropout (0.1) for budgets long enough that a model
# without it would learn the text by heart, a context of 256 where its longer steps pay.
# --size_to_budget=False turns the rule off: what is not given is then train.py's default (nanoGPT's
# 6 x 384 with batches of 64 x 256), so give the shape too (README, Results, "before sizing").
# What every budget shares was found by the 100-second search (docs/experiments.md, "Which CPU
# recipe (100 s)"): 2,048 tokens a step, rotary positions,
# multi-token prediction, Muon, more weight decay, a short warmup and a cosine schedule
# laid over the time budget. bfloat16 or float32 is chosen by measurement too (device.py).

out_dir = 'out-shakespeare-char-cpu'
eval_interval = 500
eval_iters = 20
log_interval = 10

dataset = 'shakespeare_char'

# n_layer, n_embd, n_head, learning_rate, dropout, and the context (block_size 128 or 256; 64 lost to
# 128 at 100 s) with the batch that keeps 2,048 tokens a step: sizing.py's choice, unless given
size_to_budget = True
pos_encoding = 'rope'  # clearly ahead of learned and sinusoidal with AdamW, level with learned under Muon
mtp_weight = 0.3  # also learn the token after next: lower val loss at fixed iteration counts, no slower

optimizer = 'muon'  # our Muon (muon.py); --optimizer=adamw takes a fifth of its learning rate (sizing.py)
max_seconds = 100  # of training, evals excluded; try --max_seconds=30 for a quick look
max_iters = 1_000_000  # the time budget ends the run
lr_decay_iters = 2000  # with max_seconds, warmup_iters / lr_decay_iters is the warmup's share of the time
warmup_iters = 20  # 1% of the time: a longer warmup trained worse
min_lr = 1e-4
beta2 = 0.99
weight_decay = 0.3  # more than nanoGPT's 0.1: less and more both trained worse here

device = 'cpu'
compile = False  # measured: no gain on CPU (and 'auto' would say the same)
