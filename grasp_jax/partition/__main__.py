"""`python -m grasp_jax.partition`: a label CSV -> the partition table (and its JSON file).

  python -m grasp_jax.partition --labels=train.csv.gz --strategy=healthy+frequency --k=4
  python -m grasp_jax.partition --strategy=healthy+gradient --config=configs/demo.py --k=4 \
      --workdir=workdir/demo --out=workdir/demo/partition.json

The gradient strategies measure per-class gradient alignment on a run's frozen base (its data and
model through the run's experiment builder, grasp_jax/run/gradient_partition.py), so this command,
like grasp_jax.main, is an entry point above the library's layers.
"""
import sys

from absl import app
from absl import flags
from ml_collections import config_flags

from grasp_jax import partition
from grasp_jax.data import classes as class_lists
from grasp_jax.data import labels as labels_lib
from grasp_jax.partition import cli
from grasp_jax.partition import groups as partition_groups


def _floats(flag, values):
  try:
    return [float(x) for x in values] if values else None
  except ValueError:
    raise ValueError(f"--{flag} must be numbers separated by commas, got {values}") from None


FLAGS = flags.FLAGS
flags.DEFINE_string("labels", None, "Label CSV, plain or gzip-compressed (prior strategies).")
config_flags.DEFINE_config_file("config", None, "Run config (gradient strategies).")
flags.DEFINE_string("workdir", None, "Run workdir holding the base (gradient strategies).")
flags.DEFINE_enum("strategy", "healthy+frequency", partition.STRATEGIES, "Partition strategy.")
flags.DEFINE_integer("k", None, "Number of clusters (frequency: groups by class quantiles).")
flags.DEFINE_list("thresholds", None, "Decreasing count thresholds, e.g. 100,20.")
flags.DEFINE_list("quantiles", None, "Increasing class-rank cut points in (0,1).")
flags.DEFINE_string("groups", None, "JSON file {group: [classes]} / {class: group}, or "
                    f"a built-in: {sorted(partition_groups.BUILTIN_GROUPS)}.")
flags.DEFINE_string("healthy", "No Finding", "The healthy class.")
flags.DEFINE_enum("uncertain", "error", labels_lib.UNCERTAIN_POLICIES, "Policy for -1 (uncertain).")
flags.DEFINE_string("label_column", None, "A '|'-separated findings column (NIH style).")
flags.DEFINE_list("classes", None, "Classes to use, in order (default: all label columns / "
                  "findings, which must then be classes of --dataset).")
flags.DEFINE_enum("dataset", None, sorted(class_lists.CLASS_LISTS),
                  "Class list the label columns / findings must come from (default: the one "
                  "sharing most names with the file).")
flags.DEFINE_list("ignore_columns", [], "Columns that are not labels (e.g. fold).")
flags.DEFINE_string("empty", "error", "Rows without a label: error, drop, or a cluster name.")
flags.DEFINE_bool("json", False, "Print JSON instead of a table.")
flags.DEFINE_string("out", None, "Write the partition JSON here.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  try:
    if FLAGS.strategy in partition.GRADIENT_STRATEGIES:
      if not (FLAGS.config and FLAGS.workdir):
        raise ValueError(f"--strategy={FLAGS.strategy} needs --config and --workdir")
      from grasp_jax.run import gradient_partition  # pylint: disable=g-import-not-at-top
      print(gradient_partition.run_cli(FLAGS.config, FLAGS.workdir, strategy=FLAGS.strategy,
                                       k=FLAGS.k, out=FLAGS.out, as_json=FLAGS.json))
      return
    if not FLAGS.labels:
      raise ValueError("--labels is required")
    print(cli.run(FLAGS.labels, strategy=FLAGS.strategy, k=FLAGS.k,
              thresholds=_floats("thresholds", FLAGS.thresholds),
              quantiles=_floats("quantiles", FLAGS.quantiles), groups=FLAGS.groups,
              healthy=FLAGS.healthy, uncertain=FLAGS.uncertain, label_column=FLAGS.label_column,
              classes=FLAGS.classes, dataset=FLAGS.dataset, ignore_columns=FLAGS.ignore_columns,
              empty=FLAGS.empty, as_json=FLAGS.json, out=FLAGS.out))
  except (ValueError, OSError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)


if __name__ == "__main__":
  app.run(main)
