# Fine-tune a model pretrained on Tiny Shakespeare without Romeo's and Juliet's speeches, on those
# speeches alone (README, "Your own text, and fine-tuning"):
#   awk 'BEGIN { RS = ""; ORS = "\n\n" } !/^(ROMEO|JULIET):/' data/shakespeare_char/input.txt > others.txt
#   awk 'BEGIN { RS = ""; ORS = "\n\n" } /^(ROMEO|JULIET):/' data/shakespeare_char/input.txt > romeo_juliet.txt
#   python prepare_shakespeare.py --input others.txt --dataset shakespeare_others
#   python prepare_shakespeare.py --input romeo_juliet.txt --dataset romeo_juliet --vocab_from shakespeare_others
#   python train.py config/train_shakespeare_char_cpu.py --dataset=shakespeare_others --out_dir=out-shakespeare-others
#   python train.py config/finetune_shakespeare_char.py

init_from = 'out-shakespeare-others'  # its weights; the model's shape comes from the checkpoint
out_dir = 'out-shakespeare-char-finetune'
dataset = 'romeo_juliet'

eval_interval = 50
eval_iters = 20
log_interval = 10
always_save_checkpoint = False  # the text is small: keep the checkpoint with the best val loss

batch_size = 12
block_size = 64
dropout = 0.1  # a small text overfits quickly

learning_rate = 3e-4  # gentle: adapt the pretrained weights, don't overwrite them
max_iters = 300
decay_lr = False

device = 'cpu'
compile = False
