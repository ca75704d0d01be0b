# The lecture's first model: a bigram table, each character predicting the next on its own.
# Its val loss (the lecture reports about 2.5) is the baseline the transformer has to beat.

out_dir = 'out-shakespeare-char-bigram'
model_type = 'bigram'
eval_interval = 500
eval_iters = 200
log_interval = 100

dataset = 'shakespeare_char'
batch_size = 32
block_size = 8  # the bigram sees one character; the window only sets how many targets a batch holds

learning_rate = 1e-2  # as in the lecture: a lookup table tolerates a large step
max_iters = 3000
decay_lr = False
weight_decay = 0.01  # the lecture's AdamW default
dropout = 0.0

device = 'cpu'
dtype = 'float32'
compile = False
