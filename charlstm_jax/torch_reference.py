"""The PyTorch reference, written here from SPEC.md: for parity tests, benchmarks and conversion.

`ReferenceLSTM` is the blog's model (`nn.LSTM` + dropout + `nn.Linear`, batch first, logits
`[B * T, V]`); `reference_train_step` and `reference_sample` are its training step and its
per-character sampling loop, algorithm for algorithm (numpy one-hot inputs each step, Adam,
global-norm clipping; softmax, top-k and numpy's choice per character). Needs torch (the `dev`
extra pins 2.13.0).
"""

import numpy as np
import torch
from torch import nn


class ReferenceLSTM(nn.Module):
    """The reference's `LSTMModel`: `(x[B, T, V] one-hot, h, c) -> (logits[B*T, V], h, c)`."""

    def __init__(self, vocab_size: int, hidden_size: int, num_layers: int, drop_prob: float):
        super().__init__()
        self.hidden_size, self.num_layers = hidden_size, num_layers
        self.lstm = nn.LSTM(
            vocab_size, hidden_size, num_layers, dropout=drop_prob, batch_first=True
        )
        self.dropout = nn.Dropout(drop_prob)
        self.fc = nn.Linear(hidden_size, vocab_size)

    def forward(self, x, h, c):
        out, (h, c) = self.lstm(x, (h, c))
        out = self.dropout(out).contiguous().view(-1, self.hidden_size)
        return self.fc(out), h, c

    def initial_hidden_state(self, batch_size: int):
        """Zero `(h, c)`, each `[num_layers, B, H]`."""
        zeros = torch.zeros(self.num_layers, batch_size, self.hidden_size)
        return zeros, zeros.clone()


def one_hot(ids: np.ndarray, vocab_size: int) -> np.ndarray:
    """The reference's numpy one-hot: `ids[...]` -> float32 `[..., V]`."""
    result = np.zeros((ids.size, vocab_size), dtype=np.float32)
    result[np.arange(ids.size), ids.reshape(-1)] = 1
    return result.reshape(*ids.shape, vocab_size)


def make_optimizer(model: ReferenceLSTM, learning_rate: float) -> torch.optim.Optimizer:
    """The reference's optimizer: Adam at `learning_rate` (clipping is in the step)."""
    return torch.optim.Adam(model.parameters(), lr=learning_rate)


def reference_train_step(model, optimizer, inputs, targets, h, c, clip: float):
    """One reference training step on `inputs[B, T]`, `targets[B, T]` (numpy ids).

    Returns `(loss, h, c)` with the carry detached, as the reference's loop does.
    """
    vocab_size = model.fc.out_features
    x = torch.from_numpy(one_hot(inputs, vocab_size))
    y = torch.from_numpy(targets.astype(np.int64)).view(-1)
    h, c = h.detach(), c.detach()
    model.zero_grad()
    logits, h, c = model(x, h, c)
    loss = nn.functional.cross_entropy(logits, y)
    loss.backward()
    nn.utils.clip_grad_norm_(model.parameters(), clip)
    optimizer.step()
    return loss.item(), h, c


def reference_validation_loss(model, inputs, targets) -> float:
    """The reference's validation: eval mode, fresh carry, mean loss over `inputs[N, B, T]`."""
    vocab_size = model.fc.out_features
    model.eval()
    h, c = model.initial_hidden_state(inputs.shape[1])
    losses = []
    with torch.no_grad():
        for batch_inputs, batch_targets in zip(inputs, targets, strict=True):
            logits, h, c = model(torch.from_numpy(one_hot(batch_inputs, vocab_size)), h, c)
            y = torch.from_numpy(batch_targets.astype(np.int64)).view(-1)
            losses.append(nn.functional.cross_entropy(logits, y).item())
    model.train()
    return float(np.mean(losses))


def reference_sample(model, prompt_ids, length: int, top_k: int, rng: np.random.Generator):
    """The reference's sampler: one framework call per character, numpy's choice among top-k.

    Returns `length` new ids after priming with `prompt_ids` (one character at a time).
    """
    vocab_size = model.fc.out_features
    model.eval()
    h, c = model.initial_hidden_state(1)
    out = []
    with torch.no_grad():

        def predict(char_id, h, c):
            x = torch.from_numpy(one_hot(np.array([[char_id]]), vocab_size))
            logits, h, c = model(x, h, c)
            p = nn.functional.softmax(logits, dim=1)
            p, top = p.topk(top_k)
            p, top = p.numpy().squeeze(0), top.numpy().squeeze(0)
            return int(rng.choice(top, p=p / p.sum())), h, c

        for char_id in prompt_ids:
            next_id, h, c = predict(char_id, h, c)
        out.append(next_id)
        while len(out) < length:
            next_id, h, c = predict(out[-1], h, c)
            out.append(next_id)
    return out
