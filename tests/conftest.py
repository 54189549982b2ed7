from tests.fakefeishu.fixtures import fake_feishu, lark_ws

__all__ = ["fake_feishu", "lark_ws"]
