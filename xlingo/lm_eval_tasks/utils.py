"""The docs of xlingo's lm-eval tasks, built at load time from the embedded data by
``xlingo.multiple_choice.docs`` (the items and prompt ``evaluate --multiple_choice`` scores):
nothing is downloaded and no file is written, so the tasks run offline from any directory.

lm-eval calls these as the tasks' ``custom_dataset`` with the YAML's ``dataset_kwargs``
(``lang``) and the task metadata (``--metadata '{"xlingo_split": "validation"}'`` scores
another split of the data; ``xlingo_chapter_task`` names another labelled-task directory of
the ``xlingo/data/labelled.py`` layout). Whatever split is read, lm-eval sees it as ``test``.
"""

import datasets

from xlingo import multiple_choice


def _dataset(name: str, lang: str, xlingo_split: str = "test",
             xlingo_chapter_task: str = multiple_choice.CHAPTER_TASK):
  docs = multiple_choice.docs(name, lang, xlingo_split, task=xlingo_chapter_task)
  return datasets.DatasetDict({"test": datasets.Dataset.from_list(docs)})


def chapter(lang: str, xlingo_split: str = "test",
            xlingo_chapter_task: str = multiple_choice.CHAPTER_TASK, **_metadata):
  return _dataset("chapter", lang, xlingo_split, xlingo_chapter_task)


def translation(lang: str, xlingo_split: str = "test", **_metadata):
  return _dataset("translation", lang, xlingo_split)
