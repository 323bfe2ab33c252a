r"""
Evaluation metrics: retrieval recall, COCO caption BLEU/CIDEr, VQAv2 accuracy. Pure Python/numpy, no Java.

Retrieval: LAVIS `RetrievalTask._report_metrics` (lavis/tasks/retrieval.py), on the scores of `compute_sim_matrix`.
Captions: pycocoevalcap (coco-caption) `Bleu(4)` and `Cider()`, i.e. bleu/bleu_scorer.py and cider/cider_scorer.py,
with `ptb_tokenize` standing in for its Java `PTBTokenizer`. VQA: the official VQAv2 `vqaEval.py`
(GT-Vision-Lab/VQA, the same as lavis/common/vqa_tools/vqa_eval.py).

Notable details:
- Retrieval rank = position in `np.argsort(scores)[::-1]` (ties in numpy's order, reversed, as LAVIS), best over
  an image's ground-truth texts; R@K = % of queries with rank < K. `agg_metrics` is LAVIS's: the text-retrieval mean.
- BLEU is a corpus score: clipped n-gram matches and hypothesis n-gram counts are summed over all images, the
  reference length per image is the "closest" one (ties go to the shorter), and the brevity penalty is applied once,
  to the totals. Precisions are (correct + 1e-15) / (guess + 1e-9): a zero count gives ~0, not an error.
- CIDEr is coco-caption's CIDEr-D: tf-idf over 1..4-grams, document frequencies over the *reference* sets (one
  per image), idf = log(#images) - log(max(1, df)) (0 for a single image), a cosine with the clipped numerator
  min(hyp, ref) * ref, a Gaussian length penalty with sigma = 6, x10. pycocoevalcap counts length in bigrams
  (words - 1), we in words: only an empty caption differs, and its cosine is 0.
- `ptb_tokenize` imitates Stanford PTBTokenizer 3.4.1 `-preserveLines -lowerCase` plus pycocoevalcap's punctuation
  filter, and matches the Java run on every case in tests/test_metrics.py: brackets become "-lrb-", "-rrb-", ...
  after lowercasing, so the (upper-case) filter keeps them, and runs such as "?!" stay one token. Not imitated: the
  full abbreviation list (only "u.s."-style initials and a few titles keep their final period: "no. 5" loses it),
  "'tis", "rock'n'roll" and "y'all" splits, URLs.
- VQA accuracy per question: for each of the 10 humans, min(#matches among the other 9 / 3, 1), then the mean (4+
  matching humans give 1.0, 3 give 0.9, 2 give 0.6, 1 gives 0.3). The prediction is fully normalised (punctuation,
  number words, articles, contractions); the human answers, normalised already, only get the punctuation step, and
  only if they disagree. Any "d,d" in a string makes that step delete (not space out) every listed mark: "1,000" ->
  "1000". Upstream's period regex has a malformed look-behind and gets `re.UNICODE` (= 32) as its `count`; both are
  kept. Scores are not rounded (upstream: 2 places).
"""
import math
import re
from collections import Counter

import numpy as np
import torch

# ----------------------------------------------------------------------------- retrieval


def _ranks(scores, gt):
    if isinstance(scores, torch.Tensor):  # numpy has no bfloat16
        scores = scores.detach().cpu()
        scores = scores.float() if scores.dtype in (torch.float16, torch.bfloat16) else scores
    ranks = np.zeros(len(scores))
    for i, row in enumerate(np.asarray(scores)):
        order = np.argsort(row)[::-1]  # best first
        ranks[i] = min(np.where(order == j)[0][0] for j in gt[i])
    return ranks


def retrieval_recall(scores_i2t, scores_t2i, img2txt, txt2img):
    """scores_i2t (N_img, N_txt), scores_t2i (N_txt, N_img); img2txt[i] = text ids of image i; txt2img[t] = image id."""
    tr = _ranks(scores_i2t, img2txt)
    ir = _ranks(scores_t2i, [[i] for i in txt2img])
    out = {}
    for name, ranks in (("txt", tr), ("img", ir)):
        for k in (1, 5, 10):
            out[f"{name}_r{k}"] = 100.0 * len(np.where(ranks < k)[0]) / len(ranks)
        out[f"{name}_r_mean"] = (out[f"{name}_r1"] + out[f"{name}_r5"] + out[f"{name}_r10"]) / 3
    out["r_mean"] = (out["txt_r_mean"] + out["img_r_mean"]) / 2
    out["agg_metrics"] = out["txt_r_mean"]
    return out


# ----------------------------------------------------------------------------- caption tokenizer

# pycocoevalcap's PUNCTUATIONS: these tokens are dropped after tokenising
PTB_PUNCT = {"''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":", "-", "--", "...", ";"}
_CHARS = {"’": "'", "‘": "'", "“": " ", "”": " ", "…": "...", "–": "--", "—": "--", "£": "#", "€": "$", '"': " ",
          "(": " -lrb- ", ")": " -rrb- ", "{": " -lcb- ", "}": " -rcb- ", "[": " -lsb- ", "]": " -rsb- "}
_SPLIT = re.compile(r"\.\.\.+|--+|[?!]+(?=\s|$)|[;$#%]|(?<!\d)[,:]|[,:](?!\d)")  # padded with spaces
_ABBREV = re.compile(r"(?:[a-z]\.)*[a-z]|mr|mrs|ms|dr|st|jr|sr|vs|etc")  # keep their final period: u.s. p.m. c. mr.
_SPECIAL = {"cannot": "can not", "gonna": "gon na", "gotta": "got ta", "wanna": "wan na", "lemme": "lem me",
            "gimme": "gim me"}
_CLITIC = re.compile(r"^(.+?)(n't|'s|'re|'ve|'ll|'d|'m)$")
_KEEP = {"n't", "'s", "'re", "'ve", "'ll", "'d", "'m", "-lrb-", "-rrb-", "-lcb-", "-rcb-", "-lsb-", "-rsb-"}


def _split_word(w):
    if w in _KEEP:
        return [w]
    head, tail = [], []
    while len(w) > 1 and w[0] in "'`-" and not w[1].isdigit():  # 'stop -> ' stop, but '80s stays
        head.append(w[0]); w = w[1:]
    while len(w) > 1 and w[-1] in "'`-./" and not (w[-1] == "." and _ABBREV.fullmatch(w[:-1])):
        tail.insert(0, w[-1]); w = w[:-1]  # kids' -> kids ', w/ -> w /, dog. -> dog ., but not u.s. or mr.
    if w in _SPECIAL:
        return head + _SPECIAL[w].split() + tail
    words = []
    while m := _CLITIC.match(w):  # wouldn't've -> would n't 've
        w, words = m.group(1), [m.group(2)] + words
    return head + [w] + words + tail


def ptb_tokenize(caption):
    """'A dog's toy (red), isn't it?' -> "a dog 's toy -lrb- red -rrb- is n't it" (PTB split, punctuation dropped)."""
    s = "".join(_CHARS.get(c, c) for c in caption.replace("\n", " ").lower())
    s = _SPLIT.sub(lambda m: f" {m.group(0)} ", s)
    return " ".join(t for w in s.split() for t in _split_word(w) if t not in PTB_PUNCT)


# ----------------------------------------------------------------------------- BLEU and CIDEr


def _ngrams(sentence, n=4):
    w = sentence.split()
    return Counter(tuple(w[i:i + k]) for k in range(1, n + 1) for i in range(len(w) - k + 1))


def bleu(gts, res, n=4):
    """Corpus BLEU-1..n as pycocoevalcap Bleu(n).compute_score; gts = {id: [refs]}, res = {id: [hyp]}, tokenised."""
    assert gts.keys() == res.keys()
    testlen, reflen, guess, correct = 0, 0, [0] * n, [0] * n
    for i in gts:
        (hyp,), refs = res[i], gts[i]
        hyp_len = len(hyp.split())
        max_ref = Counter()
        for r in refs:
            max_ref |= _ngrams(r, n)  # per n-gram, its max count in any one reference
        for g, c in _ngrams(hyp, n).items():
            correct[len(g) - 1] += min(c, max_ref[g])
        for k in range(n):
            guess[k] += max(0, hyp_len - k)
        testlen += hyp_len
        reflen += min((abs(len(r.split()) - hyp_len), len(r.split())) for r in refs)[1]  # "closest"
    tiny, small, scores, p = 1e-15, 1e-9, [], 1.0
    for k in range(n):
        p *= (correct[k] + tiny) / (guess[k] + small)
        scores.append(p ** (1.0 / (k + 1)))  # geometric mean of the precisions 1..k+1
    ratio = (testlen + tiny) / (reflen + small)
    if ratio < 1:  # brevity penalty, once for the whole corpus
        scores = [s * math.exp(1 - 1 / ratio) for s in scores]
    return scores


def cider(gts, res, n=4, sigma=6.0):
    """CIDEr-D as pycocoevalcap Cider().compute_score (its first return value)."""
    assert gts.keys() == res.keys()
    refs = [[_ngrams(r, n) for r in gts[i]] for i in gts]
    hyps = [_ngrams(res[i][0], n) for i in gts]
    df = Counter(g for rs in refs for g in set().union(*rs))  # in how many images' reference sets each n-gram occurs
    log_n = np.log(float(len(refs)))

    def tfidf(counts):
        vec = [{} for _ in range(n)]
        for g, tf in counts.items():
            vec[len(g) - 1][g] = float(tf) * (log_n - np.log(max(1.0, df[g])))
        norm = [np.sqrt(sum(pow(v, 2) for v in d.values())) for d in vec]
        return vec, norm, sum(counts[g] for g in vec[0])  # length in words (see the module docstring)

    scores = []
    for hyp, rs in zip(hyps, refs):
        vh, nh, lh = tfidf(hyp)
        score = np.zeros(n)
        for r in rs:
            vr, nr, lr = tfidf(r)
            val = np.zeros(n)
            for k in range(n):
                for g, v in vh[k].items():
                    val[k] += min(v, vr[k].get(g, 0.0)) * vr[k].get(g, 0.0)  # clipped
                if nh[k] != 0 and nr[k] != 0:
                    val[k] /= nh[k] * nr[k]
                val[k] *= np.e ** (-(float(lh - lr) ** 2) / (2 * sigma ** 2))  # Gaussian length penalty
            score += val
        scores.append(np.mean(score) / len(rs) * 10.0)
    return float(np.mean(np.array(scores)))


def caption_scores(gts_raw, res_raw):
    """Raw captions {id: [refs]}, {id: [hyp]} -> {"Bleu_1".."Bleu_4", "CIDEr"}, tokenised with ptb_tokenize."""
    gts = {i: [ptb_tokenize(c) for c in cs] for i, cs in gts_raw.items()}
    res = {i: [ptb_tokenize(c) for c in cs] for i, cs in res_raw.items()}
    return {**{f"Bleu_{k + 1}": b for k, b in enumerate(bleu(gts, res))}, "CIDEr": cider(gts, res)}


# ----------------------------------------------------------------------------- VQA accuracy

_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't", "dont": "don't",
    "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't", "havent": "haven't",
    "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd", "howll": "how'll",
    "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm", "Ive": "I've", "isnt": "isn't", "itd": "it'd",
    "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll", "let's": "let's", "maam": "ma'am", "mightnt": "mightn't",
    "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've", "mustnt": "mustn't",
    "mustve": "must've", "neednt": "needn't", "notve": "not've", "oclock": "o'clock", "oughtnt": "oughtn't",
    "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've",
    "she'dve": "she'd've", "she's": "she's", "shouldve": "should've", "shouldnt": "shouldn't",
    "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've", "somebodyll": "somebody'll",
    "somebodys": "somebody's", "someoned": "someone'd", "someoned've": "someone'd've", "someone'dve": "someone'd've",
    "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's", "thered": "there'd",
    "thered've": "there'd've", "there'dve": "there'd've", "therere": "there're", "theres": "there's", "theyd": "they'd",
    "theyd've": "they'd've", "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've",
    "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't",
    "whatll": "what'll", "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's",
    "whered": "where'd", "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll", "whyre": "why're",
    "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll",
    "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've", "youd": "you'd",
    "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're", "youve": "you've",
}  # the uppercase keys never match (the text is lowercased first); kept as upstream has them
_NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
            "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = {"a", "an", "the"}
_PUNCT = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!"]
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")  # sic: "(?!<=" is a look-ahead, so any "." not before a digit goes
_COMMA_STRIP = re.compile(r"(\d)(,)(\d)")


def _vqa_punctuation(text):
    out = text
    for p in _PUNCT:  # tests run on the input text, replacements on the running output, as upstream
        if p + " " in text or " " + p in text or _COMMA_STRIP.search(text):
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD_STRIP.sub("", out, re.UNICODE)  # sic: re.UNICODE lands in `count`, so at most 32 periods go


def vqa_normalize(answer):
    """A predicted answer as vqaEval.py cleans it: 'Two dogs.' -> '2 dogs', 'isnt' -> "isn't", 'The cat' -> 'cat'."""
    text = _vqa_punctuation(answer.replace("\n", " ").replace("\t", " ").strip())
    words = [_NUMBERS.get(w, w) for w in text.lower().split()]
    return " ".join(_CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES)


def vqa_accuracy(pred, answers):
    """One question: mean over the humans i of min(#(others == pred) / 3, 1); answers = the 10 human answers."""
    pred = vqa_normalize(pred)
    if len(set(answers)) > 1:
        answers = [_vqa_punctuation(a) for a in answers]
    accs = [min(1.0, sum(a == pred for j, a in enumerate(answers) if j != i) / 3) for i in range(len(answers))]
    return sum(accs) / len(accs)


def vqa_score(preds, answers_list):
    """Mean VQA accuracy x 100 over questions."""
    return 100.0 * sum(vqa_accuracy(p, a) for p, a in zip(preds, answers_list, strict=True)) / len(preds)


# ----------------------------------------------------------------------------- shapes world: is a caption true?

_WHERE = r"(?:in|at|on) the (top left|top right|bottom left|bottom right|top|bottom|left|right|middle)"
_COUNT = {"a single": 1, "one": 1, "two": 2, "three": 3}


def scene_accuracy(captions, scenes):
    """Captions against their scenes (data/shapes/*.json) -> {"accuracy": true statements / all statements,
    "objects": objects named / objects in the scenes}, over all captions. A statement is each object named by its
    shape (it exists; its colour, size and position words, where given, are that object's), a count ("two shapes",
    "a single ...") or the background. Only the words the scenes use are recognised."""
    objects = [o for s in scenes for o in s["objects"]]
    words = lambda key: "|".join(sorted({re.escape(o[key]) for o in objects}, key=len, reverse=True))
    mention = re.compile(rf"\b(?:({words('size')}) )?(?:({words('colour')}) )?({words('shape')})s?\b(?: {_WHERE})?")
    true = stated = named = 0
    for caption, scene in zip(captions, scenes, strict=True):
        caption = caption.lower()
        by_shape = {o["shape"]: o for o in scene["objects"]}
        for size, colour, shape, position in mention.findall(caption):
            o = by_shape.pop(shape, None)  # an object named twice counts once
            claims = [(v, k) for v, k in ((size, "size"), (colour, "colour"), (position, "position")) if v]
            stated += 1 + len(claims)
            if o is not None:
                true += 1 + sum(o[k] == v for v, k in claims)
                named += 1
        for count in re.findall(r"\b(?:(one|two|three) shapes|(a single))\b", caption):
            stated += 1
            true += _COUNT[count[0] or count[1]] == len(scene["objects"])
        for background in re.findall(r"on an? ([a-z ]+?) background", caption):
            stated += 1
            true += background == scene["background"]
    return {"accuracy": true / max(1, stated), "objects": named / max(1, len(objects))}
