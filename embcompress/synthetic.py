"""The embedded default data set: a synthetic Criteo-like CTR log with a known click model.

Layout as Criteo: 13 dense count features (already ``log(1 + max(x, 0))``-transformed, missing -> 0) and 26
categorical fields whose cardinalities are the Criteo Kaggle ones, scaled. Ids in each field are drawn from a
Zipf law over popularity ranks, so id 0 is the most frequent value, as the data pipeline's frequency-ranked ids.

Labels come from a factorisation-machine click model (Rendle, "Factorization Machines", ICDM 2010) with a
bias and a latent vector per categorical value, so every pair of fields interacts:

    logit = w0 + sum_f b_f[x_f] + sum_{f<g} <a_f u_f[x_f], a_g u_g[x_g]> + sum_j beta_j (d_j - mean_j)
    label ~ Bernoulli(sigmoid(logit))

``a_f`` weighs the fields, ``w0`` sets the click rate (Criteo's 25.6% by default). The default
``interaction_scale`` (0.22) gives the pairwise terms enough weight that models of interactions beat logistic
regression, as they do on real logs (on Criteo, FM and DeepFM beat LR by 0.02-0.03 AUC); with the first default,
0.08, the labels were almost first-order and LR beat every model (``benchmarks/results/models.md`` has both). The values' vectors are what
a compressed table must keep apart: hashing two popular values into one row mixes their vectors, which costs
AUC. Because the true click probability of every row is known, the Bayes-optimal AUC of the test split (the AUC
of the true probabilities) is the ceiling printed beside every result.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from sklearn.metrics import roc_auc_score

from .data import CTRData
from .validate import check_int, check_number

__all__ = [
    "CRITEO_KAGGLE_CARDINALITIES", "SyntheticConfig", "scaled_cardinalities", "make_synthetic", "seen_values_auc",
]

#: Distinct values of C1..C26 in Criteo Kaggle train.txt (as DLRM counts them, no frequency filter).
CRITEO_KAGGLE_CARDINALITIES = (
    1460, 583, 10131227, 2202608, 305, 24, 12517, 633, 3, 93145, 5683, 8351593, 3194,
    27, 14992, 5461306, 10, 5652, 2173, 4, 7046547, 18, 15, 286181, 105, 142572,
)
NUM_DENSE = 13
_KEEP_BELOW = 100
_CHUNK = 262_144


def scaled_cardinalities(exponent: float) -> tuple[int, ...]:
    """Criteo Kaggle cardinalities with the range above 100 compressed: ``n -> 100 * (n / 100) ** exponent``.

    Order between fields is kept; fields of at most 100 values keep their size; ``exponent=1`` is Criteo itself.
    """
    if not 0 < exponent <= 1:
        raise ValueError(f"cardinality exponent must be in (0, 1], got {exponent!r}")
    return tuple(
        n if n <= _KEEP_BELOW else int(round(_KEEP_BELOW * (n / _KEEP_BELOW) ** exponent))
        for n in CRITEO_KAGGLE_CARDINALITIES
    )


@dataclass(frozen=True)
class SyntheticConfig:
    """Knobs of the generator. The defaults make the benchmark's default data set."""

    rows: int = 1_200_000
    cardinality_exponent: float = 0.4
    zipf_exponent: float = 1.2
    latent_dim: int = 4
    interaction_scale: float = 0.22  # std of each latent coordinate (before the field weights)
    bias_scale: float = 0.4
    click_rate: float = 0.256
    val_fraction: float = 0.1
    test_fraction: float = 0.1
    seed: int = 0

    def __post_init__(self) -> None:
        owner = "SyntheticConfig"
        check_int("rows", self.rows, lo=10, owner=owner)
        check_int("latent_dim", self.latent_dim, lo=1, owner=owner)
        check_int("seed", self.seed, lo=0, owner=owner)
        check_number("click_rate", self.click_rate, lo=0, hi=1, lo_open=True, hi_open=True, owner=owner)
        check_number("zipf_exponent", self.zipf_exponent, positive=True, owner=owner)
        check_number("cardinality_exponent", self.cardinality_exponent, owner=owner)
        for name in ("interaction_scale", "bias_scale", "val_fraction", "test_fraction"):
            check_number(name, getattr(self, name), lo=0, owner=owner)
        if not (0 < self.val_fraction < 1 and 0 < self.test_fraction < 1 and self.val_fraction + self.test_fraction < 1):
            raise ValueError(f"val_fraction {self.val_fraction} and test_fraction {self.test_fraction} must be in "
                             "(0, 1) and sum below 1")
        scaled_cardinalities(self.cardinality_exponent)
        n_train, n_val, _ = self.split_sizes()
        if n_train < 1:
            raise ValueError(f"rows={self.rows} with val_fraction {self.val_fraction} and test_fraction "
                             f"{self.test_fraction} leaves no training rows")

    def split_sizes(self) -> tuple[int, int, int]:
        """(train, val, test) row counts; validation and test get at least one row each."""
        n_test = max(1, int(round(self.rows * self.test_fraction)))
        n_val = max(1, int(round(self.rows * self.val_fraction)))
        return self.rows - n_val - n_test, n_val, n_test


def _zipf_cdf(n: int, exponent: float) -> np.ndarray:
    p = np.arange(1, n + 1, dtype=np.float64) ** -exponent
    cdf = np.cumsum(p)
    return cdf / cdf[-1]


def _intercept(logits: np.ndarray, click_rate: float) -> float:
    """w0 such that the mean click probability equals ``click_rate`` (bisection on a monotone function)."""
    lo, hi = -20.0, 20.0
    for _ in range(60):
        mid = (lo + hi) / 2
        if np.mean(1.0 / (1.0 + np.exp(-(logits + mid)))) < click_rate:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def _click_model(cfg: SyntheticConfig, rng: np.random.Generator, cards: tuple[int, ...]):
    """The click model's parameters, drawn before any row so that they depend on the seed alone."""
    num_fields = len(cards)
    field_weight = rng.uniform(0.5, 1.5, size=num_fields)
    vectors = [rng.normal(0.0, cfg.interaction_scale, size=(c, cfg.latent_dim)) * w for c, w in zip(cards, field_weight)]
    biases = [rng.normal(0.0, cfg.bias_scale, size=c) for c in cards]
    dense_mean = rng.uniform(0.5, 3.0, size=NUM_DENSE)
    dense_missing = rng.uniform(0.0, 0.4, size=NUM_DENSE)
    dense_beta = rng.normal(0.0, 0.15, size=NUM_DENSE)
    return field_weight, vectors, biases, dense_mean, dense_missing, dense_beta


def seen_values_auc(data: CTRData, min_count: int = 1) -> float:
    """Test AUC of the true click model when it may use only values seen ``min_count`` times in training.

    A value rarer than that in the train split is replaced by its prior mean (bias 0, vector 0), which is the
    most any learner can know of it from the data: with ``min_count=1`` this bounds every model trained on the
    split (the Bayes AUC also uses the values no training row shows); larger counts show how much of the gap
    to Bayes lives in values seen too rarely to be learned. ``data`` must come from :func:`make_synthetic`.
    """
    cfg = SyntheticConfig(**data.meta["config"])
    cards = scaled_cardinalities(cfg.cardinality_exponent)
    _, vectors, biases, dense_mean, _, dense_beta = _click_model(cfg, np.random.default_rng(cfg.seed), cards)
    lo, hi = data.splits["train"]
    t_lo, t_hi = data.splits["test"]
    ids = data.sparse[t_lo:t_hi]
    total = np.zeros((len(ids), cfg.latent_dim))
    squares = np.zeros(len(ids))
    logit = (data.dense[t_lo:t_hi].astype(np.float64) - dense_mean) @ dense_beta
    for f, n in enumerate(cards):
        known = np.bincount(data.sparse[lo:hi, f], minlength=n) >= min_count
        u = vectors[f][ids[:, f]] * known[ids[:, f], None]
        total += u
        squares += np.einsum("ij,ij->i", u, u)
        logit += biases[f][ids[:, f]] * known[ids[:, f]]
    logit += 0.5 * (np.einsum("ij,ij->i", total, total) - squares)
    return float(roc_auc_score(data.labels[t_lo:t_hi], logit))


def make_synthetic(config: SyntheticConfig | None = None) -> CTRData:
    """Generate the data set of ``config`` (seeded: the same config gives the same arrays)."""
    cfg = config or SyntheticConfig()
    rng = np.random.default_rng(cfg.seed)
    cards = scaled_cardinalities(cfg.cardinality_exponent)
    num_fields, n = len(cards), cfg.rows

    field_weight, vectors, biases, dense_mean, dense_missing, dense_beta = _click_model(cfg, rng, cards)
    cdfs = [_zipf_cdf(c, cfg.zipf_exponent) for c in cards]

    sparse = np.empty((n, num_fields), dtype=np.int64)
    dense = np.empty((n, NUM_DENSE), dtype=np.float32)
    raw_logit = np.empty(n, dtype=np.float64)
    for lo in range(0, n, _CHUNK):
        hi = min(n, lo + _CHUNK)
        m = hi - lo
        total = np.zeros((m, cfg.latent_dim))
        squares = np.zeros(m)
        logit = np.zeros(m)
        for f in range(num_fields):
            ids = np.minimum(np.searchsorted(cdfs[f], rng.random(m), side="right"), cards[f] - 1)
            sparse[lo:hi, f] = ids
            u = vectors[f][ids]
            total += u
            squares += np.einsum("ij,ij->i", u, u)
            logit += biases[f][ids]
        logit += 0.5 * (np.einsum("ij,ij->i", total, total) - squares)  # sum over pairs f < g
        # Dense counts: log-normal-like, rounded to integers, then log(1 + x); missing values read as 0.
        counts = np.round(np.expm1(np.maximum(rng.normal(dense_mean, 1.0, size=(m, NUM_DENSE)), 0.0)))
        observed = np.where(rng.random((m, NUM_DENSE)) < dense_missing, 0.0, np.log1p(counts))
        dense[lo:hi] = observed
        logit += (observed - dense_mean) @ dense_beta
        raw_logit[lo:hi] = logit

    w0 = _intercept(raw_logit[: min(n, 200_000)], cfg.click_rate)
    prob = 1.0 / (1.0 + np.exp(-(raw_logit + w0)))
    labels = (rng.random(n) < prob).astype(np.float32)

    n_train, n_val, _ = cfg.split_sizes()
    splits = {"train": (0, n_train), "val": (n_train, n_train + n_val), "test": (n_train + n_val, n)}
    test = slice(n_train + n_val, n)
    y_test, p_test = labels[test], prob[test]
    bayes_auc = float(roc_auc_score(y_test, p_test)) if 0 < y_test.sum() < len(y_test) else None
    bayes_logloss = float(-np.mean(y_test * np.log(p_test) + (1 - y_test) * np.log1p(-p_test)))
    return CTRData(
        name="synthetic",
        dense=dense,
        sparse=sparse,
        labels=labels,
        cardinalities=cards,
        field_names=tuple(f"C{i + 1}" for i in range(num_fields)),
        splits=splits,
        bayes_auc=bayes_auc,
        meta={"config": asdict(cfg), "bayes_logloss": bayes_logloss, "click_rate": float(labels.mean())},
    )
