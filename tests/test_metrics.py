import random
import shutil

import numpy as np
import pytest
import torch

from nanoblip2.metrics import (bleu, caption_scores, cider, ptb_tokenize, retrieval_recall, scene_accuracy,
                               vqa_accuracy, vqa_normalize, vqa_score)

# ----------------------------------------------------------------------------- retrieval


def test_retrieval_recall_hand_computed():
    # 3 images x 4 texts; texts 1 and 2 both describe image 1
    img2txt, txt2img = [[0], [1, 2], [3]], [0, 1, 1, 2]
    s_i2t = [[0.9, 0.1, 0.3, 0.2],  # order 0,2,3,1 -> gt 0 at rank 0
             [0.2, 0.7, 0.8, 0.1],  # order 2,1,0,3 -> best of gt {1, 2} is rank 0
             [0.5, 0.6, 0.4, 0.3]]  # order 1,0,2,3 -> gt 3 at rank 3
    s_t2i = [[0.9, 0.5, 0.1],  # gt 0: rank 0
             [0.3, 0.2, 0.8],  # order 2,0,1 -> gt 1: rank 2
             [0.1, 0.7, 0.6],  # gt 1: rank 0
             [0.4, 0.3, 0.2]]  # order 0,1,2 -> gt 2: rank 2
    r = retrieval_recall(np.array(s_i2t), np.array(s_t2i), img2txt, txt2img)
    assert r["txt_r1"] == pytest.approx(200 / 3) and r["txt_r5"] == r["txt_r10"] == 100.0
    assert r["img_r1"] == 50.0 and r["img_r5"] == r["img_r10"] == 100.0
    assert r["txt_r_mean"] == pytest.approx((200 / 3 + 200) / 3) and r["img_r_mean"] == pytest.approx(250 / 3)
    assert r["r_mean"] == pytest.approx((r["txt_r_mean"] + r["img_r_mean"]) / 2)
    assert r["agg_metrics"] == r["txt_r_mean"]  # LAVIS's choice
    r_torch = retrieval_recall(torch.tensor(s_i2t).bfloat16(), torch.tensor(s_t2i), img2txt, txt2img)
    assert r_torch == r


def test_retrieval_recall_cutoffs():
    # 4 images, 16 texts (text t belongs to image t % 4); each image's best gt text placed at rank 0, 4, 5, 10
    n_img, n_txt = 4, 16
    img2txt = [[t for t in range(n_txt) if t % n_img == i] for i in range(n_img)]
    s = np.zeros((n_img, n_txt))
    for i, rank in enumerate([0, 4, 5, 10]):
        others = [t for t in range(n_txt) if t % n_img != i]
        order = others[:rank] + img2txt[i] + others[rank:]  # best first
        s[i, order] = np.arange(n_txt, 0, -1)
    txt2img = [t % n_img for t in range(n_txt)]
    r = retrieval_recall(s, np.eye(n_img)[txt2img], img2txt, txt2img)  # t2i: one-hot on the right image
    assert (r["txt_r1"], r["txt_r5"], r["txt_r10"]) == (25.0, 50.0, 75.0)  # rank < K: 0 | 0, 4 | 0, 4, 5
    assert (r["img_r1"], r["img_r5"], r["img_r10"]) == (100.0, 100.0, 100.0)


# ----------------------------------------------------------------------------- captions

GTS = {  # tokenised, 2-5 references each
    1: ["a man riding a wave on top of a surfboard", "a surfer riding a big wave in the ocean",
        "a person on a surfboard in the water", "man surfing a wave"],
    2: ["two dogs playing with a frisbee in the park", "a couple of dogs running on the grass"],
    3: ["a plate of food with broccoli and rice", "a white plate topped with rice and vegetables",
        "broccoli rice and meat on a plate", "a healthy meal on a plate", "food on a plate"],
    4: ["a red stop sign on a street corner", "a stop sign at an intersection", "a stop sign next to a road"],
    5: ["a cat sleeping on a couch", "a cat is laying on the couch", "a sleepy cat curled up on a sofa"],
    6: ["a giraffe standing next to a tree", "a tall giraffe eating leaves from a tree"],
    7: ["a man riding a bike down the street", "a person on a bicycle in the city", "a cyclist on a road",
        "a man rides his bike past a building"],
    8: ["a kitchen with a stove and a refrigerator", "a small kitchen with white appliances", "an empty kitchen"],
    9: ["a bus driving down a city street", "a red double decker bus on the road", "a bus on a street"],
    10: ["a tennis player swinging a racket", "a woman playing tennis on a court", "a tennis player hits the ball"],
}
RES = {  # varied lengths: exact copy, short, long, one word, empty, no overlap
    1: ["a man riding a wave on top of a surfboard"], 2: ["dogs"], 3: ["a plate with rice and broccoli"],
    4: ["a stop sign on the corner of a street next to a road in a city on a sunny day"], 5: ["a cat on a couch"],
    6: ["giraffe"], 7: ["a man on a bike"], 8: [""], 9: ["purple elephants dancing quietly"],
    10: ["a tennis player swinging a racket at the ball"],
}


def _coco_scores(gts, res):
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    return Bleu(4).compute_score(gts, res, verbose=0)[0], Cider().compute_score(gts, res)[0]


def test_bleu_cider_match_pycocoevalcap():
    pytest.importorskip("pycocoevalcap")
    ref_bleu, ref_cider = _coco_scores(GTS, RES)
    assert np.abs(np.array(bleu(GTS, RES)) - ref_bleu).max() < 1e-12
    assert abs(cider(GTS, RES) - ref_cider) < 1e-12
    assert 0.3 < ref_bleu[0] < 0.9 and 0.3 < ref_cider < 3  # a non-degenerate case
    long_only = {k: GTS[k] for k in (1, 4, 10)}  # hypotheses longer than the refs: no brevity penalty
    ref_bleu, ref_cider = _coco_scores(long_only, {k: RES[k] for k in long_only})
    assert np.abs(np.array(bleu(long_only, {k: RES[k] for k in long_only})) - ref_bleu).max() < 1e-12


def test_bleu_cider_match_pycocoevalcap_random():
    pytest.importorskip("pycocoevalcap")
    rng = random.Random(0)
    vocab = "a the man dog cat on in with red blue sitting riding table street grass ball two of".split()
    sent = lambda: " ".join(rng.choice(vocab) for _ in range(rng.randint(1, 14)))
    gts = {i: [sent() for _ in range(rng.randint(1, 5))] for i in range(60)}
    res = {i: [sent()] for i in gts}
    ref_bleu, ref_cider = _coco_scores(gts, res)
    assert np.abs(np.array(bleu(gts, res)) - ref_bleu).max() < 1e-12
    assert abs(cider(gts, res) - ref_cider) < 1e-12


def test_bleu_hand_computed():
    # one image, hyp "a cat on a mat" (5 words) vs refs of 6 and 3 words: closest length 6 -> BP = exp(1 - 6/5)
    gts, res = {0: ["a cat is on the mat", "a cat sat"]}, {0: ["a cat on a mat"]}
    p1 = 4 / 5  # a, cat, on, mat (+ second "a" clipped: max count of "a" in one ref is 1)
    p2 = 1 / 4  # "a cat"
    b = bleu(gts, res)
    assert b[0] == pytest.approx(p1 * np.exp(1 - 6 / 5)) and b[1] == pytest.approx((p1 * p2) ** 0.5 * np.exp(1 - 6 / 5))
    assert b[3] < 1e-5  # no 3-gram matches: ~0 through the 1e-15 "tiny", not an error
    assert cider(gts, res) == 0.0  # one image: idf = log(1) - log(df) = 0 everywhere


# raw caption -> Stanford PTBTokenizer 3.4.1 (-preserveLines -lowerCase) + pycocoevalcap's punctuation filter,
# as recorded from the Java run (test_ptb_tokenize_matches_java re-runs it where java exists)
PTB_CASES = {
    "A man riding a wave on top of a surfboard.": "a man riding a wave on top of a surfboard",
    "The dog's toy isn't red, it's blue!": "the dog 's toy is n't red it 's blue",
    "They don't know what they're doing; can't you see?": "they do n't know what they 're doing ca n't you see",
    "I'm sure he'll say we've got it, and she'd agree.": "i 'm sure he 'll say we 've got it and she 'd agree",
    'A "black-and-white" photo (taken in 1990) of Mr. Smith.':
        "a black-and-white photo -lrb- taken in 1990 -rrb- of mr. smith",
    "A cat -- sleeping... on a couch: very cute": "a cat sleeping on a couch very cute",
    "Two people at the U.S. open in 2.5 hours for $5, 50% off":
        "two people at the u.s. open in 2.5 hours for $ 5 50 % off",
    "It costs 1,000 dollars and/or more & stuff.": "it costs 1,000 dollars and/or more & stuff",
    "A sign that says 'stop' on the road": "a sign that says stop on the road",
    "The kids' shoes are on the players' bench.": "the kids shoes are on the players bench",
    "Someone cannot go, gonna wanna gotta lemme": "someone can not go gon na wan na got ta lem me",
    "A pizza with {cheese} and [tomato] toppings": "a pizza with -lcb- cheese -rcb- and -lsb- tomato -rsb- toppings",
    "Hello?! What's up": "hello ?! what 's up",
    "a #1 fan @ home; e-mail": "a # 1 fan @ home e-mail",
    "let's go to the 1990s and the '80s": "let 's go to the 1990s and the '80s",
    "A `quoted' word and ``double''": "a quoted word and double",
    "Won't WON'T Can't wouldn't've": "wo n't wo n't ca n't would n't 've",
    "a dog.Another sentence": "a dog.another sentence",
    "The U.S. is big, in the U.S.": "the u.s. is big in the u.s.",
    "A dog’s “toy” is here … and there – yes—no": "a dog 's toy is here and there yes no",
    "a cat...sleeping red,blue green;yellow what?why": "a cat sleeping red blue green yellow what?why",
    "a man -a dog- and 5-10 people, -5 degrees": "a man a dog and 5-10 people -5 degrees",
    "It's 3:00. Time, at 5 p.m., vitamin c.": "it 's 3:00 time at 5 p.m. vitamin c.",
    "Hello!! Wow!!! dog 's bone": "hello !! wow !!! dog 's bone",
    "Two dogs playing w/ a frisbee\nor a 1/2 pizza": "two dogs playing w / a frisbee or a 1/2 pizza",
    "the end.'": "the end",
    "cost is £5 and €6": "cost is # 5 and $ 6",
}


@pytest.mark.parametrize("raw", list(PTB_CASES))
def test_ptb_tokenize(raw):
    assert ptb_tokenize(raw) == PTB_CASES[raw]


@pytest.mark.skipif(shutil.which("java") is None, reason="needs java for pycocoevalcap's PTBTokenizer")
def test_ptb_tokenize_matches_java():
    pytest.importorskip("pycocoevalcap")
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer
    caps = list(PTB_CASES)
    out = PTBTokenizer().tokenize({i: [{"caption": c}] for i, c in enumerate(caps)})
    assert [ptb_tokenize(c) for c in caps] == [out[i][0] for i in range(len(caps))]


def test_caption_scores():
    gts = {1: ["A man riding a wave on top of a surfboard.", "A surfer riding a big wave."], 2: ["Two dogs, playing!"],
           3: ["The cat's bed.", "A cat in its bed"]}
    res = {1: ["A man riding a wave."], 2: ["two dogs playing"], 3: ["a cat's bed"]}
    s = caption_scores(gts, res)
    assert list(s) == ["Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "CIDEr"]
    tok = lambda d: {k: [ptb_tokenize(c) for c in v] for k, v in d.items()}
    assert tok(res)[3] == ["a cat 's bed"]
    assert [s[f"Bleu_{k}"] for k in (1, 2, 3, 4)] == bleu(tok(gts), tok(res))
    assert s["CIDEr"] == cider(tok(gts), tok(res)) > 0
    assert s["Bleu_1"] == pytest.approx(np.exp(1 - 13 / 12))  # every hyp word matches; closest lengths 6+3+4 vs 5+3+4


# ----------------------------------------------------------------------------- VQA


@pytest.mark.parametrize("raw, norm", [
    ("Two", "2"), ("a dog.", "dog"), ("isnt", "isn't"), ("The cat", "cat"), ("none", "0"), ("  yes\n", "yes"),
    ("1,000", "1000"),  # a "d,d" anywhere makes every listed punctuation mark vanish (instead of becoming a space)
    ("2.5", "2.5"), ("5.", "5"), ("red/blue", "red blue"), ("red / blue", "red blue"), ("yes!", "yes"),
    ("hot-dog", "hot dog"), ("dont know", "don't know"), ("an apple, a pear", "apple pear"), ("Ten", "10"),
])
def test_vqa_normalize(raw, norm):
    assert vqa_normalize(raw) == norm


def test_vqa_accuracy_hand_computed():
    others = ["cat", "bird", "fish", "cow", "horse", "sheep", "goat", "pig"]
    # k humans say "dog". Leaving out one of the k leaves k-1 matches, leaving out another human leaves k:
    # acc = (k * min((k-1)/3, 1) + (10-k) * min(k/3, 1)) / 10
    assert vqa_accuracy("dog", ["dog"] * 10) == 1.0
    assert vqa_accuracy("dog", ["dog"] * 4 + others[:6]) == 1.0  # (4*1 + 6*1) / 10
    assert vqa_accuracy("dog", ["dog"] * 3 + others[:7]) == pytest.approx(0.9)  # (3*2/3 + 7*1) / 10
    assert vqa_accuracy("dog", ["dog"] * 2 + others[:8]) == pytest.approx(0.6)  # (2*1/3 + 8*2/3) / 10
    assert vqa_accuracy("dog", ["dog"] + others[:8] + ["ox"]) == pytest.approx(0.3)  # (1*0 + 9*1/3) / 10
    assert vqa_accuracy("elephant", ["dog"] * 10) == 0.0
    assert vqa_accuracy("A Dog.", ["dog"] * 2 + others[:8]) == pytest.approx(0.6)  # the prediction is normalised
    # human answers only get the punctuation step, and only when they disagree: "dog!" -> "dog " != "dog"
    assert vqa_accuracy("dog", ["dog!"] * 4 + others[:6]) == 0.0
    assert vqa_accuracy("2", ["two"] * 10) == 0.0  # no number mapping on the human side
    assert vqa_accuracy("red/blue", ["red/blue"] * 9 + ["red"]) == 1.0  # both sides become "red blue"
    assert vqa_accuracy("red/blue", ["red/blue"] * 10) == 0.0  # unanimous humans are left as they are


def test_vqa_score():
    preds, answers = ["dog", "2", "no"], [["dog"] * 10, ["2"] * 2 + ["3"] * 8, ["yes"] * 10]
    assert vqa_score(preds, answers) == pytest.approx(100 * (1.0 + 0.6 + 0.0) / 3)


def test_scene_accuracy_hand_counted():
    obj = lambda shape, colour, size, position: dict(shape=shape, colour=colour, size=size, position=position)
    scenes = [{"objects": [obj("circle", "red", "big", "top left"), obj("square", "blue", "small", "right")],
               "background": "pink"},
              {"objects": [obj("star", "yellow", "small", "middle"), obj("circle", "green", "big", "top")],
               "background": "white"},
              {"objects": [obj("triangle", "black", "big", "bottom")], "background": "light grey"},
              {"objects": [obj("cross", "purple", "small", "left")], "background": "beige"}]  # the words come from
    # the scenes: without a cross somewhere, "red cross" below would be no statement at all
    captions = [
        "a big red circle in the top left and a small green square on the right on a pink background",  # 8 of 9 true
        "two shapes: a yellow star and a red cross on a white background",  # star 2/2, cross 0/2, count, bg: 4 of 6
        "A single triangle on a light grey background",                      # 3 of 3, case does not matter
        "a purple cross on the left",                                        # 3 of 3
    ]
    got = scene_accuracy(captions, scenes)
    assert got["accuracy"] == pytest.approx(18 / 21) and got["objects"] == pytest.approx(5 / 6)
    assert scene_accuracy(["two shapes on a beige background"], scenes[2:3]) == {"accuracy": 0.0, "objects": 0.0}
