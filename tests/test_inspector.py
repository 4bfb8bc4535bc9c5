"""nmt-embeddings on a trained debug run: query, analogy, export (which loads back), plot, and mistakes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from conftest import run_cli
from nmt.checkpoint import load_checkpoint
from nmt.cli import quote_free_text
from nmt.data.vocab import SPECIAL_IDS
from nmt.errors import NMTError
from nmt.inspector import EmbeddingTable, load_table, parse_analogy
from nmt.model.vectors import load_pretrained_, read_vectors
from nmt.run import load_trained, prepare_output_file

SRC_EMBED = "src_embed.embedding.weight"


def neighbours_of(stdout: str) -> list[tuple[str, float]]:
    rows = [line.split() for line in stdout.splitlines() if line.startswith("  ") and not line.strip().startswith("note")]
    return [(row[1], float(row[2])) for row in rows]


def test_query_prints_the_nearest_pieces_by_cosine(debug_run):
    out = run_cli("nmt-embeddings", f"run={debug_run}", "query=Mann", "k=5")
    assert out.returncode == 0, out.stderr[-2000:]
    neighbours = neighbours_of(out.stdout)
    assert len(neighbours) == 5 and "nearest src pieces to 'Mann' (\u2581Mann)" in out.stdout
    scores = [score for _, score in neighbours]
    assert scores == sorted(scores, reverse=True) and all(-1 <= s <= 1 for s in scores)
    # the same numbers as a direct computation on the checkpoint
    run = load_trained(debug_run, "best", torch.device("cpu"))
    weight = run.model.src_embed.weight.detach()
    mann = run.vocab.src.piece_to_id("\u2581Mann")
    expected = F.cosine_similarity(weight, weight[mann].unsqueeze(0), dim=1)
    expected[list(SPECIAL_IDS | {mann})] = -2
    top = torch.topk(expected, 5)
    assert [p for p, _ in neighbours] == [run.vocab.src.id_to_piece(int(i)) for i in top.indices]
    assert [s for _, s in neighbours] == pytest.approx(top.values.tolist(), abs=1e-3)


def test_a_word_of_several_pieces_is_the_mean_of_their_vectors(debug_run):
    run = load_trained(debug_run, "best", torch.device("cpu"))
    table = load_table(run, "src")
    word = next(w for w in ("Fahrradfahrer", "Feuerwehrmann", "Skateboarder", "Sonnenbrille")
                if len(table.ids(w)) > 1)
    vector, ids = table.vector(word)
    assert torch.equal(vector, table.weight[ids].mean(dim=0))
    out = run_cli("nmt-embeddings", f"run={debug_run}", f"query={word}", "k=3", "checkpoint=step0")
    assert out.returncode == 0 and "averaged), step0.pt" in out.stdout


def test_analogy_and_the_step0_checkpoint(debug_run):
    out = run_cli("nmt-embeddings", f"run={debug_run}", "analogy=Männer - Mann + Frau", "k=4", "checkpoint=step0")
    assert out.returncode == 0, out.stderr[-2000:]
    assert "src: Männer - Mann + Frau \u2248 (step0.pt" in out.stdout and len(neighbours_of(out.stdout)) == 4
    assert parse_analogy("König - Mann + Frau") == [(1.0, "König"), (-1.0, "Mann"), (1.0, "Frau")]
    assert parse_analogy("- T-Shirt + Hemd") == [(-1.0, "T-Shirt"), (1.0, "Hemd")]  # a hyphen inside a word
    for bad in ("Mann-Frau", "Männer - - Frau", "Männer + - Frau", "Männer - Frau -", "Männer - +", "Männer -Mann + Frau",
                "Männer- Mann + Frau", "Männer - Mann +Frau"):
        with pytest.raises(NMTError, match="a - b \\+ c"):
            parse_analogy(bad)


def test_a_piece_that_never_trained_is_pointed_out(debug_run):
    run = load_trained(debug_run, "best", torch.device("cpu"))
    table = load_table(run, "src")
    step0 = load_checkpoint(debug_run / "checkpoints" / "step0.pt")["model"][SRC_EMBED]
    unchanged = [i for i in range(4, len(step0)) if torch.equal(step0[i], table.weight[i])]
    assert unchanged, "a joint vocabulary has pieces that never occur on the source side"
    piece = run.vocab.src.id_to_piece(unchanged[0])
    assert table.untrained([unchanged[0]]) == [piece]
    out = run_cli("nmt-embeddings", f"run={debug_run}", f"query={piece}", "k=2")
    assert out.returncode == 0 and f"note: {piece} still holds its step-0 values: training never updated it" in out.stdout


def test_export_writes_word2vec_text_that_loads_back_as_src_vectors(debug_run, tmp_path):
    path = tmp_path / "src.vec"
    out = run_cli("nmt-embeddings", f"run={debug_run}", "checkpoint=last", f"export={path}")
    assert out.returncode == 0, out.stderr[-2000:]
    run = load_trained(debug_run, "last", torch.device("cpu"))
    weight = run.model.src_embed.weight.detach()
    header = path.read_text(encoding="utf-8").splitlines()[0]
    assert header == f"{len(weight) - 1} {weight.size(1)}"  # every piece but <pad>
    pieces = [run.vocab.src.id_to_piece(i) for i in range(len(weight))]
    assert torch.equal(read_vectors(path)[pieces[10]], weight[10])
    # loading it as model.embeddings.src_vectors restores every non-special row exactly
    fresh = torch.zeros_like(weight)
    coverage = load_pretrained_(fresh, pieces, path, SPECIAL_IDS)
    assert coverage.as_piece == coverage.pieces == len(weight) - 4
    assert torch.equal(fresh[4:], weight[4:])


def test_plot_draws_a_labelled_pca_map(debug_run, tmp_path):
    path = tmp_path / "map.png"
    out = run_cli("nmt-embeddings", f"run={debug_run}", "side=tgt", f"plot={path}", "plot_pieces=30")
    assert out.returncode == 0, out.stderr[-2000:]
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "the 30 most frequent pieces" in out.stdout


@pytest.mark.parametrize("args, message", [
    (["query=\u0416\u0416\u0416"], "characters the src vocabulary does not know"),
    (["query='\u2581Zzyzxqq'"], "is not a piece of the src vocabulary"),
    (["analogy=Mann"], "is not of the form"),
    ([], "Nothing to do"),
    (["query=Mann", "side=both"], "side='both' is not a valid choice"),
    (["query=Mann", "checkpoint=nope.pt"], "nope.pt does not exist"),
])
def test_mistakes_end_in_one_clear_line(debug_run, args, message):
    out = run_cli("nmt-embeddings", f"run={debug_run}", *args)
    assert out.returncode == 2, out.stdout
    assert out.stderr.startswith("nmt: error:") and message in out.stderr and "Traceback" not in out.stderr


def test_output_paths_that_cannot_be_written_are_refused_before_any_work(debug_run, tmp_path):
    blocker = tmp_path / "afile"
    blocker.write_text("x\n", encoding="utf-8")
    for args, message in (([f"export={tmp_path}"], f"export={tmp_path} is a directory"),
                          ([f"plot={blocker / 'map.png'}"], f"cannot make its directory {blocker}")):
        out = run_cli("nmt-embeddings", f"run={debug_run}", *args)
        assert out.returncode == 2 and out.stderr.startswith("nmt: error:"), out.stderr[-2000:]
        assert message in out.stderr and "Traceback" not in out.stderr
    exported = tmp_path / "new" / "dir" / "src.vec"  # a new directory is made, as for paths.run_dir
    out = run_cli("nmt-embeddings", f"run={debug_run}", f"export={exported}")
    assert out.returncode == 0 and exported.is_file(), out.stderr[-2000:]


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux's /proc")
def test_an_output_directory_that_takes_no_new_files_is_refused(tmp_path):
    with pytest.raises(NMTError, match=r"export=/proc/x.vec: cannot write in /proc \(.+\)\. Choose another path"):
        prepare_output_file(Path("/proc/x.vec"), "export")  # mkdir and os.access both succeed there, even for root
    prepare_output_file(tmp_path / "ok.vec", "export")
    assert list(tmp_path.iterdir()) == []  # the test write leaves nothing behind


def test_free_text_values_are_quoted_for_hydra():
    assert quote_free_text(["query=Männer", "k=3", "analogy=a - b + c", "query='▁Hund'", "query=it's"],
                           ("query", "analogy")) == [
        "query='Männer'", "k=3", "analogy='a - b + c'", "query='▁Hund'", "query='it\\'s'"]


def test_an_empty_query_is_refused():
    table = EmbeddingTable("src", torch.zeros(5, 2), processor=None)
    with pytest.raises(NMTError, match="empty word"):
        table.ids("  ")
