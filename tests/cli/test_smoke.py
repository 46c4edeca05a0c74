from click.testing import CliRunner

from bnfreeze.cli import cli


def test_inspect_json_guide(samples):
    import json

    result = CliRunner().invoke(cli, ["inspect", str(samples / "guide_pattern.keras"), "--json"])
    assert result.exit_code == 0
    doc = json.loads(result.stdout)
    assert doc["summary"]["batchnorm"] == 51
    assert doc["summary"]["bn_inference_in_fit"] == 51
