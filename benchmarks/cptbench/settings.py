"""The benchmark's fixed settings: data, CPT fields, implementations compared, measuring defaults."""

TEMPLATE_TEXT = "input: {x} output: {y}"
LABEL_WORDS = {"negative": "negative", "positive": "positive"}
CPT_FIELDS = dict(opt_weighted_loss_type="decay", opt_loss_decay_factor=0.95, opt_projection_epsilon=0.2,
                  opt_projection_format_epsilon=0.1)
SEED = 0
TEST_SIZE = 200
NUM_TRAIN_QUERIES = 32  # held-out Rotten Tomatoes training examples; batch B takes the first B
RSS_BATCHES = (1, 8, 32)  # batches of cptune's memory fit (peak RSS only: batch 32 is not timed)
LR = 1e-3
TRAIN_IMPLS = ("cptune", "peft", "peft-nocache")
CLASSIFY_IMPLS = ("cptune", "peft", "floor")
GIB = 1024**3
PEAK_SIZE = 2048  # fp32 matmul peak: (PEAK_SIZE x PEAK_SIZE) @ (PEAK_SIZE x PEAK_SIZE)
QUIET_WAIT = 10.0  # default longest wait (s) for other processes to go quiet before a measured round
PEAK_SHARE_GOAL = 0.65  # useful FLOPs / s of a batch-8 step, as a share of the matmul peak
OLD_BATCH_CONTEXT_MIB = 0.17  # the padded layout's MiB per context token per row (issue 13)
BATCH_CONTEXT_TOLERANCE = 0.05  # the fitted batch x context term counts as absent below this share of the old one
AGREE_TOLERANCE = 1e-5  # loss and gradient relative error against PEFT, float32
BATCH1_NOISE = 0.95  # batch-1 ratio at or above this counts as "no slower" within run-to-run noise
