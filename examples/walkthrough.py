"""The seed project's walk-through on wonderland-gpt's API: tokenizer, model, dataset, a training
loop you can read, then a sample. Small sizes, so it finishes in about a minute on a laptop CPU.

    python examples/walkthrough.py

For real training use `gpt train`, which adds validation, checkpoints, resuming and a schedule.
"""

import time

import torch
from torch.utils.data import DataLoader

from gpt.dataset import build_dataset
from gpt.logs import log_batch
from gpt.model import GPT
from gpt.retriever import Retriever
from gpt.tokenizer import build_tokenizer

torch.manual_seed(0)

# 1. A byte-level BPE tokenizer trained on Alice's training split (lossless: decode(encode(s)) == s).
tokenizer = build_tokenizer(vocab_size=512)

# 2. The model: GPT-1 blocks, here 2 layers and 64 wide instead of the paper's 12 x 768.
model = GPT(
    vocab_size=tokenizer.get_vocab_size(), sequence_len=64, num_layers=2, embed_dim=64, num_heads=4,
    forward_expansion=4, dropout=0.1, pad_idx=tokenizer.token_to_id("[PAD]"),
)

# 3. The dataset: every 64-token window of the training split, paired with the same window shifted by one.
dataset = build_dataset(tokenizer, sequence_len=64)
loader = DataLoader(dataset, batch_size=32, shuffle=True)
print(f"{len(dataset):,} windows; model has {model.num_params():,} parameters")

# 4. Training: next-token cross-entropy and AdamW. A slice of an epoch keeps the walk-through short.
optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
total_epochs, total_batches = 1, 300
start = time.time()
model.train()
for epoch_index in range(total_epochs):
    for batch_index, (inputs, targets) in enumerate(loader):
        if batch_index == total_batches:
            break
        logits = model(inputs)  # (batch, 64, vocab)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if batch_index % 50 == 0 or batch_index == total_batches - 1:
            log_batch(loss.item(), start, epoch_index, total_epochs, batch_index, total_batches)

# 5. Sampling: the prompt followed by the model's continuation.
model.eval()
answer = Retriever(tokenizer, model).generate("what is your name?", max_new_tokens=60, seed=0)
print(answer)
