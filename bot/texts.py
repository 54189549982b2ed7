"""The bot's own sentences, in Chinese and English (`feishu.language`)."""

from __future__ import annotations

from typing import Literal

Language = Literal["zh", "en"]

_TEXTS: dict[str, dict[Language, str]] = {
    "help": {
        "zh": (
            "我可以看图回答问题。\n"
            "- 发一张图片（或带说明文字的图片、截图），我会描述或回答你的问题；\n"
            "- 之后直接发文字，我会结合上一张图片回答；没有图片时就普通聊天；\n"
            "- 群聊里请 @我。\n"
            "命令：/help 帮助，/reset 忘掉本会话的图片和上下文，/status 查看状态，"
            "/cancel 停止我正在写的回答。"
        ),
        "en": (
            "I answer questions about pictures.\n"
            "- Send a picture (alone, with a caption, or a pasted screenshot) and I describe it or "
            "answer your question;\n"
            "- then just send text and I answer about that last picture; with no picture I simply chat;\n"
            "- in group chats, @ me.\n"
            "Commands: /help, /reset (forget this chat's pictures and context), /status, "
            "/cancel (stop the answer I am writing for you)."
        ),
    },
    "unsupported": {
        "zh": (
            "抱歉，我还看不懂这种消息（{kind}）。我能看图片（可以带文字说明或截图）并回答文字问题。"
            "发送 /help 查看用法。"
        ),
        "en": (
            "Sorry, I can't read this kind of message ({kind}). I understand pictures (with or "
            "without a caption, screenshots too) and text questions. Send /help for more."
        ),
    },
    "reset": {
        "zh": "好的，已忘掉本会话的图片和上下文。",
        "en": "Done: I forgot this chat's pictures and context.",
    },
    "cancelled": {"zh": "已停止你的回答。", "en": "Stopped your answer."},
    "nothing_to_cancel": {"zh": "你现在没有正在生成的回答。", "en": "You have no answer in progress."},
    "status": {
        "zh": "模型：{model}（{state}）\n队列：{queue}/{capacity}，正在生成：{active}\n已运行：{uptime}",
        "en": "Model: {model} ({state})\nQueue: {queue}/{capacity}, generating: {active}\nUptime: {uptime}",
    },
    "unknown_command": {
        "zh": "没有这个命令：{command}。发送 /help 查看可用命令。",
        "en": "Unknown command: {command}. Send /help for the list.",
    },
    "rate_limited": {
        "zh": "你发得有点快了，请 {seconds} 秒后再试。",
        "en": "You're sending a bit fast; please try again in {seconds} s.",
    },
    "stale": {
        "zh": "这条消息发送于 {minutes} 分钟前，我刚刚才收到，就不按新消息回答了；如果还需要，请重新发送。",
        "en": (
            "This message was sent {minutes} min ago and only reached me now, so I won't answer it "
            "as if it were new; please send it again if you still need an answer."
        ),
    },
    "not_allowed": {
        "zh": "抱歉，这个机器人没有对你或本群开放。",
        "en": "Sorry, this bot is not enabled for you or this chat.",
    },
    "reading": {"zh": "正在看图片…", "en": "Looking at the picture…"},
    "thinking": {"zh": "思考中…", "en": "Thinking…"},
    "queued": {"zh": "排队中，前面还有 {ahead} 个", "en": "Queued: {ahead} ahead of you"},
    "picture_failed": {
        "zh": "抱歉，我没能取到这张图片，请重新发送。",
        "en": "Sorry, I couldn't fetch that picture; please send it again.",
    },
    "describe": {"zh": "请描述这张图片。", "en": "Describe this picture."},
    "describe_forwarded": {
        "zh": "请看看这些转发的消息，说说你的看法。",
        "en": "What do you make of these forwarded messages?",
    },
    "quoting": {"zh": "引用：{text}", "en": "Quoting: {text}"},
    "forwarded": {"zh": "转发的消息：\n{lines}", "en": "Forwarded messages:\n{lines}"},
    "left_out_both": {
        "zh": "（内容较多，其中 {messages} 条消息和 {pictures} 张图片我没有看。）",
        "en": "(There was more than I read: I left out {messages} message(s) and {pictures} picture(s).)",
    },
    "left_out_messages": {
        "zh": "（内容较多，其中 {messages} 条消息我没有看。）",
        "en": "(There was more than I read: I left out {messages} message(s).)",
    },
    "left_out_pictures": {
        "zh": "（图片较多，其中 {pictures} 张我没有看：每个问题最多看 {limit} 张。）",
        "en": "(Too many pictures: I left out {pictures}; I look at {limit} per question at most.)",
    },
    "what_quoted": {"zh": "你引用的消息", "en": "the message you quoted"},
    "what_forwarded": {"zh": "转发的消息", "en": "the forwarded messages"},
    "reference_permission": {
        "zh": "抱歉，我读不到{what}：这个应用缺少 {permission} 权限。请管理员为应用开通这个权限后再问我。",
        "en": (
            "Sorry, I can't read {what}: this app lacks the {permission} permission. Please ask an "
            "admin to grant it to the app, then ask me again."
        ),
    },
    "reference_gone": {
        "zh": "抱歉，我看不到{what}（可能已被撤回，或者发在我加入这个群之前）。",
        "en": "Sorry, I can't see {what} (it may have been recalled, or sent before I joined this chat).",
    },
    "reference_failed": {
        "zh": "抱歉，我暂时没能读取{what}，请稍后再试。",
        "en": "Sorry, I couldn't fetch {what} just now; please try again shortly.",
    },
    "kept": {
        "zh": "服务正在重启。你的问题已保存，恢复后会在这里回答。",
        "en": "The service is restarting. Your question is kept and will be answered here when it is back.",
    },
    "restarted_too_old": {
        "zh": "抱歉，我刚才在重启，这条消息等得太久了；如果还需要，请重新提问。",
        "en": (
            "Sorry, I was restarting and this message waited too long; please ask again if you still "
            "need an answer."
        ),
    },
    "gave_up": {
        "zh": "抱歉，回答这个问题时服务已经中断了 {attempts} 次，我先不再尝试了。请换个问法，或稍后再试。",
        "en": (
            "Sorry, the service stopped {attempts} times while answering this, so I've set it aside. "
            "Please rephrase it or try again later."
        ),
    },
    "failed": {"zh": "抱歉，出了点问题。", "en": "Sorry, something went wrong."},
    "cancelled_suffix": {"zh": "（已停止）", "en": "(stopped)"},
    "stopped": {"zh": "已停止。", "en": "Stopped."},
    "button_stop": {"zh": "停止", "en": "Stop"},
    "button_retry": {"zh": "重新回答", "en": "Try again"},
    "toast_stopping": {"zh": "正在停止…", "en": "Stopping…"},
    "toast_finished": {"zh": "这个回答已经结束了。", "en": "This answer has already finished."},
    "toast_retrying": {"zh": "好的，重新回答。", "en": "OK, answering again."},
    "toast_retried": {"zh": "已经重新回答过了。", "en": "This was already answered again."},
    "toast_running": {
        "zh": "这个回答还没写完，可以先停止它。",
        "en": "This answer is still being written; stop it first.",
    },
    "toast_not_allowed": {"zh": "抱歉，你不能操作这个回答。", "en": "Sorry, you can't act on this answer."},
    "toast_unknown": {"zh": "找不到这个回答了。", "en": "This answer is no longer known."},
    "error_busy": {
        "zh": "现在请求太多，我忙不过来了，请 {seconds} 秒后再试。",
        "en": "I'm too busy right now; please try again in {seconds} s.",
    },
    "error_timeout": {
        "zh": "抱歉，这个回答超时了，请稍后再试。",
        "en": "Sorry, this answer took too long; please try again later.",
    },
    "error_bad_image": {
        "zh": "抱歉，这张图片我打不开（格式不支持或已损坏）。",
        "en": "Sorry, I can't open this picture (unsupported format or damaged).",
    },
    "error_too_large": {
        "zh": "抱歉，图片或对话太大了，请发小一点的图片，或发送 /reset 重新开始。",
        "en": "Sorry, the picture or the conversation is too large; send a smaller picture or /reset.",
    },
    "error_unavailable": {
        "zh": "模型还在加载或暂时不可用，请稍后再试。",
        "en": "The model is still loading or unavailable; please try again shortly.",
    },
    "error_bad_request": {
        "zh": "抱歉，这条消息我处理不了：{detail}",
        "en": "Sorry, I can't handle this message: {detail}",
    },
    "error_internal": {
        "zh": "抱歉，出了点问题，没能回答。请稍后再试。",
        "en": "Sorry, something went wrong and I couldn't answer. Please try again later.",
    },
}


def text(key: str, language: Language, **values: object) -> str:
    """The sentence *key* in *language*, formatted with *values*; KeyError for an unknown key."""
    return _TEXTS[key][language].format(**values)


def error_text(code: str, language: Language, *, message: str = "", retry_after: float | None = None) -> str:
    """A clear sentence for a `server.errors` wire code (unknown codes read as internal)."""
    key = f"error_{code}"
    if key not in _TEXTS:
        key = "error_internal"
    seconds = max(1, round(retry_after)) if retry_after else 5
    return text(key, language, seconds=seconds, detail=message)
