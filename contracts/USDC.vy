# pragma version ~=0.4.3
"""
@title A USDC-style ERC-20 for development and tests
@notice 6 decimals like Circle's USDC ERC-20 interface. The deployer is the minter.
        Used only on the in-process devnet; on Arc the real USDC at 0x3600…0000 is used.
"""

from ethereum.ercs import IERC20

implements: IERC20

event Transfer:
    sender: indexed(address)
    receiver: indexed(address)
    value: uint256

event Approval:
    owner: indexed(address)
    spender: indexed(address)
    value: uint256

name: public(String[32])
symbol: public(String[8])
decimals: public(uint8)
totalSupply: public(uint256)
balanceOf: public(HashMap[address, uint256])
allowance: public(HashMap[address, HashMap[address, uint256]])
minter: public(address)


@deploy
def __init__():
    self.name = "USD Coin (devnet)"
    self.symbol = "USDC"
    self.decimals = 6
    self.minter = msg.sender


@external
def transfer(receiver: address, amount: uint256) -> bool:
    assert receiver != empty(address), "ERC20: transfer to the zero address"
    assert self.balanceOf[msg.sender] >= amount, "ERC20: transfer amount exceeds balance"
    self.balanceOf[msg.sender] -= amount
    self.balanceOf[receiver] += amount
    log Transfer(sender=msg.sender, receiver=receiver, value=amount)
    return True


@external
def transferFrom(sender: address, receiver: address, amount: uint256) -> bool:
    assert receiver != empty(address), "ERC20: transfer to the zero address"
    assert self.allowance[sender][msg.sender] >= amount, "ERC20: insufficient allowance"
    assert self.balanceOf[sender] >= amount, "ERC20: transfer amount exceeds balance"
    self.allowance[sender][msg.sender] -= amount
    self.balanceOf[sender] -= amount
    self.balanceOf[receiver] += amount
    log Transfer(sender=sender, receiver=receiver, value=amount)
    return True


@external
def approve(spender: address, amount: uint256) -> bool:
    self.allowance[msg.sender][spender] = amount
    log Approval(owner=msg.sender, spender=spender, value=amount)
    return True


@external
def mint(receiver: address, amount: uint256):
    assert msg.sender == self.minter, "USDC: only the minter mints"
    assert receiver != empty(address), "ERC20: mint to the zero address"
    self.totalSupply += amount
    self.balanceOf[receiver] += amount
    log Transfer(sender=empty(address), receiver=receiver, value=amount)
