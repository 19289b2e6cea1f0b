"""A generated demo collection and a tokenizer trained on the fly, for the CPU demo.

The collection is built so that lexical matching is misleading and meaning is learnable:

- 10 domains (cooking, cars, ...), each with 6 concepts; a concept has a canonical word
  and three synonyms ("car": automobile, vehicle, sedan).
- A topic (one information need, one query) is a domain and two of its concepts. Its
  query uses the canonical words only ("car engine").
- Each topic gets ``docs_per_topic`` documents (~20-40 words): on-topic documents that
  mention both concepts mostly through synonyms, partly on-topic documents that mention
  one of them, and distractors: documents of another domain that repeat the query's
  canonical words.
- Graded relevance, judged over the whole corpus: 2 = same domain and both concepts,
  1 = same domain and one concept, 0 = anything else (distractors included).

BM25 ranks the distractors first (they share the query's words) and misses the synonyms,
so its nDCG@10 is far from 1; a model that learns which words belong together can do
better. Held-out queries are other concept pairs of the same domains, so every word of an
evaluation query occurs in the training data.

Files written by :func:`make_demo`: ``train.jsonl`` (FlagEmbedding groups, one per
positive document of a training query: every grade-2 document and two grade-1 ones, with
8 negatives mined from BM25's top 30 and topped up at random; pos_scores / neg_scores are
the grades) and ``eval/`` (BEIR: corpus.jsonl with every document, queries.jsonl with the
held-out queries, qrels/test.tsv with grades 1 and 2).

One group per positive matters: with one group per query (one positive each) a tiny model
memorizes the training queries and does not beat BM25 on held-out ones; with ~840 groups
and BM25 hard negatives (the same candidates the evaluation reranks), a 2-layer, 64-wide
Qwen2 (vocab 512, max_length 160) reranking BM25's top 30 went from ~0.35-0.40 untrained to
~0.50-0.52 nDCG@10 (BM25: 0.36) after 150 steps of 2 listwise groups (lr 3e-3, two seeds).
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterable
from dataclasses import dataclass
from itertools import combinations
from pathlib import Path

from ..errors import RecipeError

__all__ = ["DOMAINS", "DemoPaths", "demo_texts", "make_demo", "train_demo_tokenizer"]

# domain -> concepts; the first word of a concept is its canonical form (the one queries
# use), the others its synonyms. No word occurs twice in the whole table.
DOMAINS: dict[str, list[list[str]]] = {
    "cooking": [
        ["soup", "broth", "stew", "bisque"],
        ["oven", "stove", "cooker", "hob"],
        ["knife", "blade", "cleaver", "cutter"],
        ["spice", "seasoning", "herbs", "condiment"],
        ["bread", "loaf", "bun", "dough"],
        ["dinner", "supper", "meal", "feast"],
    ],
    "garden": [
        ["garden", "yard", "allotment", "backyard"],
        ["seed", "kernel", "grain", "sprout"],
        ["weed", "nettle", "thistle", "bramble"],
        ["soil", "earth", "dirt", "loam"],
        ["flower", "blossom", "bloom", "petal"],
        ["watering", "irrigation", "sprinkler", "hose"],
    ],
    "cars": [
        ["car", "automobile", "vehicle", "sedan"],
        ["engine", "motor", "powertrain", "cylinder"],
        ["tire", "wheel", "tyre", "rim"],
        ["repair", "fix", "mend", "overhaul"],
        ["fuel", "petrol", "gasoline", "diesel"],
        ["brake", "caliper", "rotor", "pads"],
    ],
    "health": [
        ["doctor", "physician", "clinician", "medic"],
        ["fever", "temperature", "chills", "pyrexia"],
        ["pill", "tablet", "capsule", "medication"],
        ["hospital", "clinic", "infirmary", "ward"],
        ["cough", "wheeze", "phlegm", "hacking"],
        ["injury", "wound", "trauma", "bruise"],
    ],
    "finance": [
        ["bank", "lender", "creditor", "banker"],
        ["loan", "credit", "mortgage", "borrowing"],
        ["tax", "levy", "duty", "tariff"],
        ["money", "cash", "funds", "currency"],
        ["investment", "portfolio", "shares", "equity"],
        ["salary", "wage", "pay", "income"],
    ],
    "music": [
        ["song", "tune", "melody", "ballad"],
        ["guitar", "banjo", "ukulele", "strings"],
        ["concert", "gig", "recital", "performance"],
        ["singer", "vocalist", "crooner", "soprano"],
        ["drum", "percussion", "cymbal", "snare"],
        ["album", "record", "vinyl", "disc"],
    ],
    "computers": [
        ["computer", "laptop", "desktop", "workstation"],
        ["bug", "defect", "glitch", "fault"],
        ["password", "passcode", "login", "credentials"],
        ["program", "software", "application", "app"],
        ["network", "internet", "wifi", "router"],
        ["screen", "monitor", "display", "panel"],
    ],
    "travel": [
        ["hotel", "inn", "lodge", "motel"],
        ["flight", "airline", "plane", "jet"],
        ["luggage", "baggage", "suitcase", "bags"],
        ["ticket", "fare", "pass", "voucher"],
        ["beach", "shore", "coast", "seaside"],
        ["passport", "visa", "customs", "border"],
    ],
    "pets": [
        ["dog", "puppy", "hound", "canine"],
        ["cat", "kitten", "feline", "tomcat"],
        ["vet", "veterinarian", "vaccination", "checkup"],
        ["leash", "lead", "collar", "harness"],
        ["kibble", "feed", "chow", "treats"],
        ["grooming", "brushing", "bathing", "trimming"],
    ],
    "home": [
        ["house", "home", "dwelling", "residence"],
        ["roof", "shingles", "gutter", "rafters"],
        ["plumbing", "pipes", "faucet", "drain"],
        ["paint", "varnish", "primer", "coating"],
        ["heating", "boiler", "radiator", "furnace"],
        ["window", "pane", "glazing", "shutter"],
    ],
}

# Sentence frames shared by every domain (so frames carry no topic signal); {a} and {b}
# are concept mentions.
_FRAMES_TWO = [
    "this short guide covers {a} and also {b}",
    "many people ask how {a} relates to {b}",
    "we compared the {a} with the {b} last week",
    "the best {a} often depends on the {b}",
    "notes on {a} with a few tips about {b}",
    "a good {a} makes the {b} much easier",
]
_FRAMES_ONE = [
    "everyone seems to talk about {a} these days",
    "read on for more about the {a}",
    "our {a} was fine after a while",
    "there is a lot to learn about {a}",
    "it is worth checking the {a} first",
    "some say the {a} matters most",
]
_QUERY_FRAMES = ["{a} {b}", "{a} and {b}", "{a} {b} tips", "about {a} and {b}", "{a} with {b}"]
_CANONICAL_RATE = 0.2  # how often an on-topic document names a concept by its canonical word
_TRAIN_PARTIAL = 2  # grade-1 documents that get a training group of their own, per query
_TRAIN_NEGATIVES = 8  # negatives per training group
_MINE_DEPTH = 30  # BM25 depth for hard negatives (the evaluation reranks BM25's top 30 too)


@dataclass(frozen=True)
class DemoPaths:
    """Where :func:`make_demo` wrote the collection."""

    root: Path
    train: Path  # train.jsonl: FlagEmbedding groups
    eval: Path  # eval/: BEIR folder (corpus.jsonl, queries.jsonl, qrels/test.tsv)
    stage1_train: Path  # stage1_train.jsonl: binary (query, document, label) pairs of the training queries
    stage1_eval: Path  # stage1_eval.jsonl: the same for the held-out queries


@dataclass
class _Doc:
    doc_id: str
    domain: str
    concepts: frozenset[int]
    text: str


def _mention(rng: random.Random, concept: list[str]) -> str:
    if rng.random() < _CANONICAL_RATE:
        return concept[0]
    return rng.choice(concept[1:])


def _on_topic_text(rng: random.Random, domain: str, concepts: list[int], words: tuple[int, int]) -> str:
    """A document of ``domain`` about ``concepts`` (each mentioned twice), ~20-40 words."""
    table = DOMAINS[domain]
    mentions = [c for c in concepts for _ in range(2)]
    rng.shuffle(mentions)
    sentences = []
    while mentions:
        if len(mentions) >= 2 and mentions[0] != mentions[1] and rng.random() < 0.7:
            a, b = mentions.pop(), mentions.pop()
            sentences.append(rng.choice(_FRAMES_TWO).format(a=_mention(rng, table[a]), b=_mention(rng, table[b])))
        else:
            sentences.append(rng.choice(_FRAMES_ONE).format(a=_mention(rng, table[mentions.pop()])))
    low, high = words
    while sum(len(s.split()) for s in sentences) < low:
        sentences.append(rng.choice(_FRAMES_ONE).format(a=_mention(rng, table[rng.choice(concepts)])))
    while len(sentences) > 1 and sum(len(s.split()) for s in sentences) > high:
        sentences.pop()
    return ". ".join(sentences) + "."


def _distractor_text(rng: random.Random, domain: str, concepts: list[int], query_words: list[str]) -> str:
    """A document of ``domain`` that also repeats words of another domain's query."""
    table = DOMAINS[domain]
    sentences = [rng.choice(_FRAMES_TWO).format(a=query_words[0], b=_mention(rng, table[concepts[0]]))]
    sentences.append(rng.choice(_FRAMES_TWO).format(a=query_words[1], b=_mention(rng, table[concepts[1]])))
    sentences.append(rng.choice(_FRAMES_ONE).format(a=_mention(rng, table[concepts[rng.randrange(2)]])))
    rng.shuffle(sentences)
    return ". ".join(sentences) + "."


def _bm25_candidates(queries: list[str], docs: list[_Doc], k: int) -> list[list[str]]:
    """BM25's top ``k`` document ids per query."""
    import bm25s

    retriever = bm25s.BM25()
    retriever.index(bm25s.tokenize([d.text for d in docs], show_progress=False), show_progress=False)
    hits, _ = retriever.retrieve(bm25s.tokenize(queries, show_progress=False), k=min(k, len(docs)), show_progress=False)
    return [[docs[int(j)].doc_id for j in row] for row in hits]


def _grade(query: tuple[str, frozenset[int]], doc: _Doc) -> int:
    domain, concepts = query
    if doc.domain != domain:
        return 0
    return len(concepts & doc.concepts)


def _split_eval(rng: random.Random, topics: list[tuple[str, tuple[int, int]]], n_eval: int) -> set[int]:
    """Indices of ``n_eval`` held-out topics, preferring topics whose concepts all still
    occur in some training topic (always possible at the default sizes)."""
    counts: dict[tuple[str, int], int] = {}
    for domain, pair in topics:
        for c in pair:
            counts[(domain, c)] = counts.get((domain, c), 0) + 1
    order = list(range(len(topics)))
    rng.shuffle(order)
    held: set[int] = set()
    for i in order:
        if len(held) == n_eval:
            break
        domain, pair = topics[i]
        if all(counts[(domain, c)] > 1 for c in pair):
            held.add(i)
            for c in pair:
                counts[(domain, c)] -= 1
    # small collections may not allow it: fill up with topics whose concepts are unseen
    held.update([i for i in order if i not in held][: n_eval - len(held)])
    return held


def make_demo(
    out_dir: str | Path,
    *,
    num_queries: int = 120,
    docs_per_topic: int = 6,
    seed: int = 1234,
    eval_fraction: float = 0.25,
) -> DemoPaths:
    """Write the demo collection under ``out_dir`` (same seed, same bytes).

    Args:
        num_queries: topics (queries) in all, at most 10 domains x 15 concept pairs = 150.
        docs_per_topic: documents written per topic (>= 3): about a third specific
            (grade 2), a third partly on-topic (grade 1), the rest distractors.
        eval_fraction: share of the queries held out for ``eval/`` (disjoint from training).

    Returns:
        DemoPaths(root, train, eval).
    """
    pairs = [(d, p) for d in DOMAINS for p in combinations(range(len(DOMAINS[d])), 2)]
    if not 2 <= num_queries <= len(pairs):
        raise RecipeError(f"data.demo_queries (num_queries) must be in [2, {len(pairs)}], got {num_queries}")
    if docs_per_topic < 3:
        raise RecipeError(
            f"data.demo_docs_per_topic must be >= 3 (specific, partial, distractor), got {docs_per_topic}"
        )
    rng = random.Random(seed)
    topics = rng.sample(pairs, num_queries)
    n_specific = max(1, docs_per_topic // 3)
    n_partial = max(1, docs_per_topic // 3)
    n_distract = docs_per_topic - n_specific - n_partial
    domains = list(DOMAINS)

    docs: list[_Doc] = []
    queries: list[str] = []
    for t, (domain, (a, b)) in enumerate(topics):
        table = DOMAINS[domain]
        queries.append(rng.choice(_QUERY_FRAMES).format(a=table[a][0], b=table[b][0]))
        others = [c for c in range(len(table)) if c not in (a, b)]
        specs: list[tuple[str, list[int], bool]] = []
        for _ in range(n_specific):
            extra = [rng.choice(others)] if rng.random() < 0.5 else []
            specs.append((domain, [a, b, *extra], False))
        for _ in range(n_partial):
            specs.append((domain, [rng.choice((a, b)), rng.choice(others)], False))
        for _ in range(n_distract):
            other = rng.choice([d for d in domains if d != domain])
            specs.append((other, rng.sample(range(len(DOMAINS[other])), 2), True))
        for k, (doc_domain, concepts, distractor) in enumerate(specs):
            if distractor:
                text = _distractor_text(rng, doc_domain, concepts, [table[a][0], table[b][0]])
            else:
                text = _on_topic_text(rng, doc_domain, concepts, (20, 40))
            docs.append(_Doc(f"d{t:03d}_{k}", doc_domain, frozenset(concepts), text))
    order = list(range(len(docs)))
    rng.shuffle(order)  # so that a topic's documents are not neighbours in the corpus
    docs = [docs[i] for i in order]

    n_eval = max(1, round(num_queries * eval_fraction))
    held = _split_eval(rng, topics, n_eval)
    root = Path(out_dir)
    (root / "eval" / "qrels").mkdir(parents=True, exist_ok=True)
    grades = [{d.doc_id: _grade((domain, frozenset(pair)), d) for d in docs} for domain, pair in topics]
    text_of = {d.doc_id: d.text for d in docs}

    train_ids = [t for t in range(num_queries) if t not in held]
    hard = _bm25_candidates([queries[t] for t in train_ids], docs, k=_MINE_DEPTH)
    train_lines = []
    for t, candidates in zip(train_ids, hard, strict=True):
        g = grades[t]
        # one group per positive: every specific document, a few partly relevant ones
        specific = sorted(d for d, s in g.items() if s == 2)
        partial = sorted(d for d, s in g.items() if s == 1)
        positives = specific + sorted(rng.sample(partial, min(len(partial), _TRAIN_PARTIAL)))
        # hard negatives mined with BM25 (as FlagEmbedding's hn_mine does), then random ones
        mined = [d for d in candidates if g[d] == 0]
        unrelated = sorted(d for d, s in g.items() if s == 0 and d not in mined)
        for p in positives:
            neg = rng.sample(mined, min(len(mined), _TRAIN_NEGATIVES))
            neg += rng.sample(unrelated, _TRAIN_NEGATIVES - len(neg))
            record = {
                "query": queries[t],
                "pos": [text_of[p]],
                "neg": [text_of[d] for d in neg],
                "pos_scores": [float(g[p])],
                "neg_scores": [0.0] * len(neg),
            }
            train_lines.append(json.dumps(record))
    train = root / "train.jsonl"
    train.write_text("\n".join(train_lines) + "\n", encoding="utf-8")

    corpus = [json.dumps({"_id": d.doc_id, "title": "", "text": d.text}) for d in sorted(docs, key=lambda d: d.doc_id)]
    (root / "eval" / "corpus.jsonl").write_text("\n".join(corpus) + "\n", encoding="utf-8")
    held_sorted = sorted(held)
    eval_queries = [json.dumps({"_id": f"q{t:03d}", "text": queries[t]}) for t in held_sorted]
    (root / "eval" / "queries.jsonl").write_text("\n".join(eval_queries) + "\n", encoding="utf-8")
    qrels = ["query-id\tcorpus-id\tscore"]
    for t in held_sorted:
        qrels += [f"q{t:03d}\t{d}\t{s}" for d, s in sorted(grades[t].items()) if s > 0]
    (root / "eval" / "qrels" / "test.tsv").write_text("\n".join(qrels) + "\n", encoding="utf-8")

    # Stage-1 pairs: binary labels, grade 2 -> 1, grade 0 -> 0 (grade 1 is neither), balanced per
    # query with BM25-mined negatives first. Own RNG: the files above stay byte-identical.
    pair_rng = random.Random(seed + 1)
    held_hard = _bm25_candidates([queries[t] for t in held_sorted], docs, k=_MINE_DEPTH)
    hard_of = dict(zip(train_ids, hard, strict=True)) | dict(zip(held_sorted, held_hard, strict=True))
    for name, ids in (("stage1_train.jsonl", train_ids), ("stage1_eval.jsonl", held_sorted)):
        lines = []
        for t in ids:
            g = grades[t]
            positives = sorted(d for d, s in g.items() if s == 2)
            negatives = [d for d in hard_of[t] if g[d] == 0][: len(positives)]
            pairs = [(d, 1) for d in positives] + [(d, 0) for d in negatives]
            pair_rng.shuffle(pairs)
            lines += [json.dumps({"query": queries[t], "document": text_of[d], "label": y}) for d, y in pairs]
        (root / name).write_text("\n".join(lines) + "\n", encoding="utf-8")
    return DemoPaths(
        root=root, train=train, eval=root / "eval",
        stage1_train=root / "stage1_train.jsonl", stage1_eval=root / "stage1_eval.jsonl",
    )  # fmt: skip


def demo_texts(paths: DemoPaths) -> list[str]:
    """Every distinct query and document of a demo collection (tokenizer training text)."""
    texts = []
    for line in paths.train.read_text(encoding="utf-8").splitlines():
        rec = json.loads(line)
        texts += [rec["query"], *rec["pos"], *rec["neg"]]
    for name in ("corpus.jsonl", "queries.jsonl"):
        texts += [json.loads(line)["text"] for line in (paths.eval / name).read_text(encoding="utf-8").splitlines()]
    return list(dict.fromkeys(texts))  # each once, first-seen order


# Qwen2's pre-tokenizer split (single digits, words with their leading space), so that the
# demo tokenizer splits text the way the real one does.
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
# Output-set tokens of both templates: each must be one token.
_SINGLE_TOKENS = ("0", "1", "yes", "no")


def train_demo_tokenizer(texts: Iterable[str], vocab_size: int = 512, out_dir: str | Path | None = None):
    """A small byte-level BPE tokenizer (Qwen2's pre-tokenization) trained on ``texts``.

    The fixed text of both templates is part of the training data (weighted like one
    prompt per training text) so that prompts stay short; "yes" / "no" are weighted so that
    they become single tokens ("0" / "1" are single bytes). Special tokens: <|endoftext|>
    (also the pad token), <|im_start|>, <|im_end|> (also eos); no BOS.

    Args:
        texts: training text (queries and documents).
        vocab_size: total vocabulary including the 256 byte symbols and the 3 special tokens.
        out_dir: where to ``save_pretrained`` (reloads offline with AutoTokenizer); None: not saved.

    Returns:
        transformers.PreTrainedTokenizerFast.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from .templates import TEMPLATES

    texts = [t for t in texts if t]
    if vocab_size < 256 + len(SPECIAL_TOKENS) + 8:
        raise ValueError(f"vocab_size must leave room for merges above 256 bytes + specials, got {vocab_size}")
    fixed = []
    for template in TEMPLATES.values():
        fixed += [template.prefix, template.query_label, template.document_label, template.suffix]
        if template.default_instruction:
            fixed.append(template.instruction_format.format(instruction=template.default_instruction))
    weight = max(1, len(texts))
    corpus = texts + fixed * weight + list(_SINGLE_TOKENS) * weight * 4

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_QWEN2_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # any text round-trips
        show_progress=False,
    )
    tokenizer.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
        clean_up_tokenization_spaces=False,
        model_max_length=32768,
    )
    for token in _SINGLE_TOKENS:
        ids = fast.encode(token, add_special_tokens=False)
        if len(ids) != 1:  # pragma: no cover - the weighting above makes this unreachable
            raise RuntimeError(f"demo tokenizer: {token!r} is not a single token ({ids})")
    if out_dir is not None:
        fast.save_pretrained(str(out_dir))
    return fast
