# enwik8 at a size the literature reports: 12 layers of 512, 8 heads, a context of 512 bytes (the
# shape of Al-Rfou et al.'s T12, 44M parameters, which reports 1.11 test bits per character with
# auxiliary losses this repo does not have), on a GPU:
#   python prepare_shakespeare.py --dataset=enwik8      # 90M bytes train, 5M val, 5M test
#   python train.py config/train_enwik8.py
#   python train.py config/train_enwik8.py --eval_only=True --eval_split=test   # the papers' figure
# The papers count enwik8's bytes as its characters: the loss / ln 2 is bits per character.

out_dir = 'out-enwik8'
dataset = 'enwik8'
eval_interval = 2000  # the val split is 5M bytes: evals read a fixed sample of it, the end a larger one
eval_iters = 100
log_interval = 50
always_save_checkpoint = False  # keep the model with the best val loss

n_layer = 12
n_head = 8
n_embd = 512
block_size = 512
dropout = 0.1  # 90M bytes take many passes to overfit; a little dropout for the passes it makes
mtp_weight = 0.3  # the token after next, as the CPU recipes learn it

batch_size = 32  # 16,384 bytes a step
gradient_accumulation_steps = 1
optimizer = 'muon'
learning_rate = 3e-3
weight_decay = 0.1
max_iters = 100_000  # about 18 passes over the train split
lr_decay_iters = 100_000
warmup_iters = 1000
min_lr = 3e-4
beta2 = 0.99

# compile is 'auto' (the default): on for CUDA
