# The lecture's and nanoGPT's GPU recipe: a 10.65M-parameter character-level GPT on Tiny Shakespeare.
# nanoGPT reports a best val loss of 1.4697 over these 5000 iterations on one A100; this repo's run
# of it is in README, Results (per iteration: docs/experiments.md, "What the GPU recipe reproduces").

out_dir = 'out-shakespeare-char'
eval_interval = 250  # the model overfits this small dataset, so evaluate often
eval_iters = 200
log_interval = 10
always_save_checkpoint = False  # save only when val improves

n_layer = 6
n_head = 6
n_embd = 384
dropout = 0.2
block_size = 256  # context of up to 256 previous characters

dataset = 'shakespeare_char'
batch_size = 64
gradient_accumulation_steps = 1

max_iters = 5000
warmup_iters = 100
learning_rate = 1e-3  # small networks can take a higher learning rate
lr_decay_iters = 5000  # usually equal to max_iters
min_lr = 1e-4  # learning_rate / 10
beta2 = 0.99  # a little larger than GPT-2's 0.95 because there are few tokens per iteration

# compile is 'auto' (the default): on for CUDA, where it pays; off on CPU and MPS, where it does not
