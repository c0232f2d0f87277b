"""Reading collectives back from compiled HLO text: tuple results, numbered tuple parts, group sizes."""

from __future__ import annotations

from gesr_jax.train import hlo_collectives

HLO = """
  %all-reduce.1 = (f32[16,5,16]{2,1,0}, /*index=1*/f32[3]{0}) all-reduce(%a, %b), channel_id=1, replica_groups=mesh['data'=2,'model'=4] {'model'}, to_apply=%add
  %all-reduce.2 = f32[2512,64]{1,0} all-reduce(%c), channel_id=2, replica_groups=mesh['data'=1,'model'=8] {'data'}, to_apply=%add
  %reduce_scatter.7 = f32[4,5,16]{2,1,0} reduce-scatter(%x), channel_id=3, replica_groups={{0,1,2,3},{4,5,6,7}}, dimensions={0}
  %ag = s32[16,5]{1,0} all-gather-start(%y), replica_groups=[2,4]<=[8], dimensions={0}
  %x = f32[2]{0} add(%a, %b)
"""  # noqa: E501


def test_collectives_are_read_with_every_tuple_part_and_their_group_size():
    found = hlo_collectives.collectives(HLO)
    assert [(c.kind, c.shapes, c.group_size) for c in found] == [
        ("all-reduce", ((16, 5, 16), (3,)), 4),
        ("all-reduce", ((2512, 64),), 1),
        ("reduce-scatter", ((4, 5, 16),), 4),
        ("all-gather", ((16, 5),), 4),
    ]
    assert found[0].nbytes == 4 * (16 * 5 * 16 + 3)
    by_kind = hlo_collectives.bytes_by_kind(HLO)  # the size-1 group moves nothing: left out
    assert by_kind == {"all-reduce": 4 * (1280 + 3), "reduce-scatter": 4 * 320, "all-gather": 4 * 80, "all-to-all": 0}
