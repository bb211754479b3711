"""A fake Exchange Web Services endpoint speaking SOAP: CreateItem, GetFolder, scripted faults."""

from __future__ import annotations

import base64
import threading
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from typing import Any

from .https import Handler, HttpsServer, message_id, start_https_server
from .idp import IdpState

SOAP = "http://schemas.xmlsoap.org/soap/envelope/"
M = "http://schemas.microsoft.com/exchange/services/2006/messages"
T = "http://schemas.microsoft.com/exchange/services/2006/types"
E = "http://schemas.microsoft.com/exchange/services/2006/errors"
EWS_PATH = "/EWS/Exchange.asmx"


@dataclass
class Sent:
    """One CreateItem the fake accepted."""

    mime: bytes
    disposition: str  # SendOnly or SendAndSaveCopy
    saved_folder: str | None
    to: list[str]
    cc: list[str]
    bcc: list[str]
    impersonated: str | None
    authorization: str  # "bearer:<user or app>", "basic:<user>", "ntlm:<user>"
    at: float = field(default_factory=time.time)


@dataclass
class EwsState:
    auth: str = "bearer"  # bearer | basic | ntlm
    idp: IdpState | None = None  # validates bearer tokens
    username: str = "svc-relay@contoso.com"
    password: str = "s3cret-pw"
    require_impersonation: bool = False  # app-only tokens must carry ExchangeImpersonation
    # Scripted faults, consumed one per CreateItem: "busy", "sendas", "nomailbox", "badrecipient",
    # "toolarge", "http500", "http502", "http503", "http504", "http401", "reset",
    # "hang:<seconds>"; "keep-then-<fault>" keeps (sends) the message first, then answers with
    # the fault, so the answer is lost although the mail went out (issue 30).
    faults: list[str] = field(default_factory=list)
    busy_back_off_ms: int = 30000
    sent: list[Sent] = field(default_factory=list)
    calls: list[str] = field(default_factory=list)  # SOAP operation of each authorised request
    unauthorized: int = 0
    block: threading.Event | None = None  # CreateItem waits for this before answering
    entered: threading.Event = field(default_factory=threading.Event)  # a CreateItem arrived
    record_then_block: bool = False  # with block: keep the message, then never answer
    search_denied: bool = False  # FindItem in Sent Items answers ErrorAccessDenied
    searches: list[str] = field(default_factory=list)  # InternetMessageIds searched for
    lock: threading.Lock = field(default_factory=threading.Lock)


def envelope(body: str) -> bytes:
    return (f'<?xml version="1.0" encoding="utf-8"?>'
            f'<s:Envelope xmlns:s="{SOAP}"><s:Header>'
            f'<h:ServerVersionInfo xmlns:h="{T}" MajorVersion="15" MinorVersion="20" '
            f'MajorBuildNumber="7000" MinorBuildNumber="0" Version="V2018_01_08"/>'
            f'</s:Header><s:Body>{body}</s:Body></s:Envelope>').encode()


def fault(code: str, message: str, back_off_ms: int | None = None) -> bytes:
    extra = ""
    if back_off_ms is not None:
        extra = (f'<t:MessageXml xmlns:t="{T}"><t:Value Name="BackOffMilliseconds">'
                 f'{back_off_ms}</t:Value></t:MessageXml>')
    return (f'<?xml version="1.0" encoding="utf-8"?><s:Envelope xmlns:s="{SOAP}"><s:Body>'
            f'<s:Fault><faultcode xmlns:a="{T}">a:{code}</faultcode>'
            f'<faultstring xml:lang="en-US">{message}</faultstring><detail>'
            f'<e:ResponseCode xmlns:e="{E}">{code}</e:ResponseCode>'
            f'<e:Message xmlns:e="{E}">{message}</e:Message>{extra}'
            f'</detail></s:Fault></s:Body></s:Envelope>').encode()


def create_item_error(code: str, message: str) -> bytes:
    return envelope(
        f'<m:CreateItemResponse xmlns:m="{M}" xmlns:t="{T}"><m:ResponseMessages>'
        f'<m:CreateItemResponseMessage ResponseClass="Error"><m:MessageText>{message}'
        f'</m:MessageText><m:ResponseCode>{code}</m:ResponseCode>'
        f'<m:DescriptiveLinkKey>0</m:DescriptiveLinkKey><m:Items/>'
        f'</m:CreateItemResponseMessage></m:ResponseMessages></m:CreateItemResponse>')


ITEM_ERRORS = {
    "sendas": ("ErrorSendAsDenied", "The user account which was used to submit this request "
               "does not have the right to send mail on behalf of the specified sending account., "
               "Cannot submit message."),
    "nomailbox": ("ErrorNonExistentMailbox", "The SMTP address has no mailbox associated with it."),
    "badrecipient": ("ErrorInvalidRecipients", "At least one recipient isn't valid., A message "
                     "can't be sent because it contains no recipients."),
    "toolarge": ("ErrorMessageSizeExceeded", "The message exceeds the maximum supported size."),
}


def _addresses(item: ET.Element, tag: str) -> list[str]:
    return [e.text or "" for e in item.findall(f"t:{tag}/t:Mailbox/t:EmailAddress",
                                              {"t": T})]


class EwsHandler(Handler):
    state: EwsState  # type: ignore[assignment]
    _ntlm: Any = None
    _ntlm_user: str | None = None

    def do_POST(self) -> None:  # noqa: N802 - stdlib naming
        st = self.state
        body = self.read_body()
        if self.path != EWS_PATH:
            self.reply(404, "not found")
            return
        who = self.authorize()
        if who is None:
            return
        try:
            root = ET.fromstring(body)
        except ET.ParseError:
            self.reply(400, "bad xml")
            return
        op_el = root.find(f"{{{SOAP}}}Body/*")
        op = op_el.tag.split("}")[1] if op_el is not None else ""
        with st.lock:
            st.calls.append(op)
        imp = root.find(f"{{{SOAP}}}Header/{{{T}}}ExchangeImpersonation/{{{T}}}ConnectingSID/"
                        f"{{{T}}}PrimarySmtpAddress")
        impersonated = imp.text if imp is not None else None
        if st.require_impersonation and who == "bearer:app" and impersonated is None:
            self.soap(500, fault("ErrorImpersonateUserDenied",
                                 "An app-only token needs the ExchangeImpersonation header."))
            return
        if op == "GetFolder" and op_el is not None:
            self.get_folder(op_el)
        elif op == "CreateItem" and op_el is not None:
            self.create_item(op_el, who, impersonated)
        elif op == "FindItem" and op_el is not None:
            self.find_item(op_el)
        else:
            self.soap(500, fault("ErrorInvalidRequest", f"{op} is not supported by this fake"))

    def soap(self, status: int, data: bytes) -> None:
        self.reply(status, data, "text/xml; charset=utf-8")

    # -- authentication --------------------------------------------------------------------------

    def authorize(self) -> str | None:
        st = self.state
        header = self.headers.get("Authorization", "")
        scheme, _, value = header.partition(" ")
        if st.auth == "ntlm":
            return self.authorize_ntlm(scheme, value)
        if st.auth == "bearer" and scheme.lower() == "bearer" and st.idp is not None:
            issued = st.idp.check_bearer(value.strip())
            if issued is not None:
                return f"bearer:{issued.user or 'app'}"
        if st.auth == "basic" and scheme.lower() == "basic":
            user, _, pw = base64.b64decode(value).decode().partition(":")
            if user == st.username and pw == st.password:
                return f"basic:{user}"
        self.deny('Basic realm="fake-ews"' if st.auth == "basic" else "Bearer")
        return None

    def deny(self, challenge: str) -> None:
        with self.state.lock:
            self.state.unauthorized += 1
        self.reply(401, "", headers={"WWW-Authenticate": challenge})

    def authorize_ntlm(self, scheme: str, value: str) -> str | None:
        if self._ntlm_user is not None:
            return f"ntlm:{self._ntlm_user}"  # NTLM authenticates the connection
        if scheme.lower() != "ntlm":
            self.deny("NTLM")
            return None
        import spnego  # the server side reads accounts from $NTLM_USER_FILE

        if self._ntlm is None:
            self._ntlm = spnego.server(protocol="ntlm")
        try:
            out = self._ntlm.step(base64.b64decode(value))
        except Exception:  # noqa: BLE001 - any handshake failure is a refusal
            self._ntlm = None
            self.deny("NTLM")
            return None
        if not self._ntlm.complete:
            self.reply(401, "", headers={"WWW-Authenticate": "NTLM " +
                                         base64.b64encode(out or b"").decode()})
            return None
        self._ntlm_user = str(self._ntlm.client_principal)
        return f"ntlm:{self._ntlm_user}"

    # -- operations ------------------------------------------------------------------------------

    def get_folder(self, op: ET.Element) -> None:
        ids = op.findall(f"{{{M}}}FolderIds/*")
        messages = []
        for i, folder in enumerate(ids):
            name = folder.get("Id", "folder")
            messages.append(
                f'<m:GetFolderResponseMessage ResponseClass="Success">'
                f'<m:ResponseCode>NoError</m:ResponseCode><m:Folders><t:Folder>'
                f'<t:FolderId Id="{name}-id-{i}" ChangeKey="AQAAAA=="/>'
                f'<t:FolderClass>IPF.Note</t:FolderClass><t:DisplayName>{name}</t:DisplayName>'
                f'<t:TotalCount>0</t:TotalCount><t:ChildFolderCount>0</t:ChildFolderCount>'
                f'<t:UnreadCount>0</t:UnreadCount></t:Folder></m:Folders>'
                f'</m:GetFolderResponseMessage>')
        self.soap(200, envelope(f'<m:GetFolderResponse xmlns:m="{M}" xmlns:t="{T}">'
                                f'<m:ResponseMessages>{"".join(messages)}</m:ResponseMessages>'
                                f'</m:GetFolderResponse>'))

    def find_item(self, op: ET.Element) -> None:
        """FindItem restricted on message:InternetMessageId (relayd's dedupe lookup)."""
        st = self.state
        ns = {"t": T, "m": M}
        field_uri = op.find(".//m:Restriction//t:FieldURI", ns)
        constant = op.find(".//m:Restriction//t:Constant", ns)
        if field_uri is None or field_uri.get("FieldURI") != "message:InternetMessageId" or \
                constant is None:
            self.soap(500, fault("ErrorInvalidRequest", "unsupported FindItem restriction"))
            return
        wanted = constant.get("Value", "")
        with st.lock:
            st.searches.append(wanted)
            found = [x for x in st.sent if x.disposition == "SendAndSaveCopy" and
                     message_id(x.mime) == wanted]
        if st.search_denied:
            self.soap(200, envelope(
                f'<m:FindItemResponse xmlns:m="{M}" xmlns:t="{T}"><m:ResponseMessages>'
                f'<m:FindItemResponseMessage ResponseClass="Error"><m:MessageText>Access is '
                f'denied.</m:MessageText><m:ResponseCode>ErrorAccessDenied</m:ResponseCode>'
                f'<m:DescriptiveLinkKey>0</m:DescriptiveLinkKey></m:FindItemResponseMessage>'
                f'</m:ResponseMessages></m:FindItemResponse>'))
            return
        items = "".join(
            f'<t:Message><t:ItemId Id="sent-{i}" ChangeKey="CQAAAA=="/>'
            f'<t:DateTimeSent>{time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(x.at))}'
            f'</t:DateTimeSent></t:Message>' for i, x in enumerate(found))
        self.soap(200, envelope(
            f'<m:FindItemResponse xmlns:m="{M}" xmlns:t="{T}"><m:ResponseMessages>'
            f'<m:FindItemResponseMessage ResponseClass="Success">'
            f'<m:ResponseCode>NoError</m:ResponseCode>'
            f'<m:RootFolder TotalItemsInView="{len(found)}" IncludesLastItemInRange="true">'
            f'<t:Items>{items}</t:Items></m:RootFolder></m:FindItemResponseMessage>'
            f'</m:ResponseMessages></m:FindItemResponse>'))

    def create_item(self, op: ET.Element, who: str, impersonated: str | None) -> None:
        st = self.state
        st.entered.set()
        if st.block is not None and not st.record_then_block:
            st.block.wait(30)
        with st.lock:
            action = st.faults.pop(0) if st.faults else None
        after_keep = None
        if action is not None and action.startswith("keep-then-"):
            after_keep = action.removeprefix("keep-then-")
        elif action is not None and self.misbehave(action):
            return
        ns = {"t": T, "m": M}
        item = op.find("m:Items/t:Message", ns)
        mime_el = item.find("t:MimeContent", ns) if item is not None else None
        if item is None or mime_el is None or not mime_el.text:
            self.soap(500, fault("ErrorInvalidRequest", "CreateItem without MimeContent"))
            return
        saved = op.find("m:SavedItemFolderId/*", ns)
        record = Sent(
            mime=base64.b64decode(mime_el.text),
            disposition=op.get("MessageDisposition", ""),
            saved_folder=saved.get("Id") if saved is not None else None,
            to=_addresses(item, "ToRecipients"), cc=_addresses(item, "CcRecipients"),
            bcc=_addresses(item, "BccRecipients"), impersonated=impersonated,
            authorization=who)
        with st.lock:
            st.sent.append(record)
        if after_keep is not None and self.misbehave(after_keep):
            return
        if st.block is not None and st.record_then_block:
            st.block.wait(30)
            self.reset_connection()  # relayd is gone; the copy stays in Sent Items
            return
        self.soap(200, envelope(
            f'<m:CreateItemResponse xmlns:m="{M}" xmlns:t="{T}"><m:ResponseMessages>'
            f'<m:CreateItemResponseMessage ResponseClass="Success">'
            f'<m:ResponseCode>NoError</m:ResponseCode><m:Items/>'
            f'</m:CreateItemResponseMessage></m:ResponseMessages></m:CreateItemResponse>'))

    def misbehave(self, action: str) -> bool:
        """Answer with a scripted fault; False to go on normally."""
        st = self.state
        if action == "busy":
            self.soap(500, fault("ErrorServerBusy", "The server cannot service this request "
                                 "right now. Try again later.", st.busy_back_off_ms))
        elif action in ITEM_ERRORS:
            self.soap(200, create_item_error(*ITEM_ERRORS[action]))
        elif action == "http500":
            self.reply(500, "Internal Server Error", "text/html")
        elif action in ("http502", "http503", "http504"):  # a gateway's: no SOAP in it
            self.reply(int(action[4:]), f"<html><body>{action[4:]} from the gateway</body>"
                       "</html>", "text/html")
        elif action == "http401":
            self.deny("Bearer")
        elif action == "reset":
            self.reset_connection()
        elif action.startswith("hang:"):
            threading.Event().wait(float(action.split(":", 1)[1]))
            self.reset_connection()
        else:
            return False
        return True


def start_ews(state: EwsState | None = None) -> HttpsServer:
    """Start a fake EWS; the endpoint is `server.base_url + EWS_PATH`."""
    return start_https_server(EwsHandler, state or EwsState())
