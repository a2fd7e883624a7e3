"""llmc/passes/positions.py: `arange(tokens)` indexing a position table becomes the step's position_ids; any other
arange stays (and the engine refuses it). BART's family matching transformers is tests/test_architectures.py's."""

from __future__ import annotations

import torch

from llmc.passes.positions import positions

aten = torch.ops.aten


class PositionTable(torch.nn.Module):
    """BART's decoder in miniature: positions = arange(tokens) + cache length, looked up at an offset of 2."""

    def __init__(self, also_scale_by_position: bool = False):
        super().__init__()
        self.table = torch.nn.Embedding(40, 4)
        self.also_scale_by_position = also_scale_by_position

    def forward(self, input_ids, position_ids):
        pos = torch.arange(input_ids.shape[1]) + 0
        out = self.table(pos.unsqueeze(0) + 2)
        if self.also_scale_by_position:  # a use that is not a table index: the pass cannot read it as positions
            out = out * pos[None, :, None]
        return out


def _traced(module):
    tokens = torch.export.Dim("num_tokens", min=2, max=32)
    example = (torch.zeros(1, 5, dtype=torch.long), torch.arange(5)[None])
    program = torch.export.export(module, example, dynamic_shapes=({1: tokens}, {1: tokens}))
    return program.module()


def _aranges(gm):
    return [n for n in gm.graph.nodes if n.target in (aten.arange.default, aten.arange.start)]


def test_a_position_table_reads_the_steps_positions():
    module = PositionTable().eval()
    gm = _traced(module)
    assert _aranges(gm)
    gm, record = positions(gm, None)
    gm.recompile()
    assert record == {"positions": 1} and not _aranges(gm)
    ids = torch.zeros(1, 3, dtype=torch.long)
    decode_positions = torch.tensor([[7, 8, 20]])  # e.g. a decode token at 7, and tokens of other sequences
    torch.testing.assert_close(gm(ids, decode_positions), module.table(decode_positions + 2))


def test_an_arange_used_otherwise_stays():
    gm, record = positions(_traced(PositionTable(also_scale_by_position=True).eval()), None)
    assert record == {"positions": 0} and len(_aranges(gm)) == 1


def test_bart_matches_transformers_where_positions_decide_the_tokens(tmp_path, monkeypatch):
    # The sweep's tiny BART repeats one token; larger weights make each step's token depend on its position.
    from llmc import sweep

    monkeypatch.setitem(sweep.OVERRIDES, "bart", {"init_std": 0.5})
    monkeypatch.setattr(sweep, "NEW_TOKENS", 16)
    result = sweep.check("bart", tmp_path)
    assert result.status == "matches", result.detail
